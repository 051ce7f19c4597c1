"""Camera estimation and refinement against the current 3-D object (ReconViaGen §4.2.3.2, appendix A.1).

RVC needs the input views' cameras in the generator's object frame, to pixel accuracy.
:class:`PoseRefiner` gets them in two parts:

1. **Start cameras** from a pluggable source ``start(representation, images) -> Cameras``:
   :class:`NearestRenderStart` renders the current object from ``n_renders`` known orbit poses and
   gives every input the known pose of its nearest render -- nearest by a pose estimator's cameras
   when one is given (the official code runs VGGT on [20 orbit renders + one input] and takes the
   nearest render's known pose, which is how VGGT's first-camera frame is mapped into TRELLIS's
   object frame; the paper: 30 random renders + inputs), else by image distance; or
   (``mapping="align"``) the estimator's input cameras moved into the object frame by the
   similarity fitted on the renders' estimated vs known poses. Any callable can stand in (e.g. a
   VGGT wrapper), or fixed cameras.
2. **Refinement**, at most ``rounds`` (3) rounds per view: render the object at the current camera
   (colour + depth), match features between the render and the input (``matcher``, default
   :class:`OpenCVMatcher`: ORB or SIFT + brute-force kNN + Lowe's ratio test; the official code
   uses MASt3R, any callable with the same contract plugs in), lift the matched render pixels
   to 3-D with the rendered depth and the render's camera (pixels whose 3×3 neighbourhood is not
   all covered, or whose depth jumps there by more than ``depth_jump`` of the median depth, are
   left out: silhouette depth is unreliable), and solve ``cv2.solvePnPRansac`` (EPnP, 1 px,
   2,000 iterations, the current pose as the extrinsic guess, as the official code), then
   ``cv2.solvePnPRefineLM`` on the inliers (``refine_lm``; a recon3d addition that the
   official code replaces by Open3D RANSAC + scaled ICP, not ported). The intrinsics stay the
   start camera's.

A failed round (fewer than ``min_matches`` matches or ``min_inliers`` inliers, PnP failure,
a non-finite pose, the object behind the camera) keeps the previous camera of that view and logs a
warning naming the view and the reason; refinement never raises for it. Rounds stop early for a
view once its update is below ``tol_deg`` and ``tol_trans`` (relative to the camera distance).

Conventions: recon3d :class:`~recon3d.data.cameras.Cameras` (OpenCV axes, c2w, pixel ``(u, v)``
centred at ``(u + 0.5, v + 0.5)``). OpenCV keypoints put pixel centres at integer coordinates,
so matched points get ``+ 0.5`` before PnP with recon3d's ``K``. Perspective cameras only (an
orthographic view keeps its start camera, with a warning).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from recon3d.data.batch import Views
from recon3d.data.cameras import Cameras, intrinsics_from_fov, look_at
from recon3d.errors import ConfigError, ShapeError
from recon3d.models.refiners.base import Refiner, test_time_optimization, trainable_copy
from recon3d.representations import RenderOutput
from recon3d.representations.reconstruction import Reconstruction
from recon3d.utils.checks import check_option

__all__ = ["OpenCVMatcher", "NearestRenderStart", "PoseRefiner", "PoseRefinement", "rotation_angle_deg"]

log = logging.getLogger(__name__)

Matcher = Callable[[np.ndarray, np.ndarray, "np.ndarray | None", "np.ndarray | None"], tuple[np.ndarray, np.ndarray]]


def rotation_angle_deg(Ra: np.ndarray | torch.Tensor, Rb: np.ndarray | torch.Tensor) -> float:
    """Geodesic angle (degrees) between two rotation matrices ``(3, 3)``."""
    Ra, Rb = np.asarray(Ra, dtype=np.float64), np.asarray(Rb, dtype=np.float64)
    c = (np.trace(Ra.T @ Rb) - 1) / 2
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` in [0, 1] -> ``(H, W, 3)`` uint8 RGB."""
    return (img.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


class OpenCVMatcher:
    """Feature matches between two RGB uint8 images ``(H, W, 3)``.

    Args:
        detector: ``"orb"`` (binary, Hamming distance) or ``"sift"`` (L2).
        n_features: features per image.
        ratio: Lowe's ratio test on the two nearest neighbours.

    ``matcher(img_a, img_b, mask_a=None, mask_b=None) -> (pts_a (M, 2), pts_b (M, 2))`` float64
    OpenCV pixel coordinates (pixel centres at integers); masks ``(H, W)`` uint8 limit detection.
    """

    DETECTORS = ("orb", "sift")

    def __init__(self, detector: str = "orb", n_features: int = 4000, ratio: float = 0.8):
        if detector not in self.DETECTORS:
            raise ConfigError(f"detector: expected one of {list(self.DETECTORS)}, got {detector!r}")
        check_option("n_features", n_features, 1, integer=True)
        check_option("ratio", ratio, 0.0, strict=True)
        self.detector, self.n_features, self.ratio = detector, int(n_features), float(ratio)

    def _make(self):
        import cv2

        if self.detector == "orb":
            # fastThreshold low: renders of small objects have little contrast at their edges.
            return cv2.ORB_create(nfeatures=self.n_features, fastThreshold=5, edgeThreshold=15, patchSize=15), cv2.NORM_HAMMING
        return cv2.SIFT_create(nfeatures=self.n_features), cv2.NORM_L2

    def __call__(self, img_a: np.ndarray, img_b: np.ndarray, mask_a: np.ndarray | None = None,
                 mask_b: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        det, norm = self._make()
        ga, gb = cv2.cvtColor(img_a, cv2.COLOR_RGB2GRAY), cv2.cvtColor(img_b, cv2.COLOR_RGB2GRAY)
        ka, da = det.detectAndCompute(ga, mask_a)
        kb, db = det.detectAndCompute(gb, mask_b)
        empty = np.zeros((0, 2))
        if da is None or db is None or len(ka) < 2 or len(kb) < 2:
            return empty, empty
        pairs = cv2.BFMatcher(norm).knnMatch(da, db, k=2)
        good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < self.ratio * p[1].distance]
        if not good:
            return empty, empty
        pa = np.array([ka[m.queryIdx].pt for m in good], dtype=np.float64)
        pb = np.array([kb[m.trainIdx].pt for m in good], dtype=np.float64)
        return pa, pb


def _render_default(background, opts):
    def fn(rep, cameras: Cameras) -> RenderOutput:
        from recon3d.render import render

        return render(rep, cameras, background, **opts)

    return fn


class NearestRenderStart:
    """Start cameras from the nearest of ``n_renders`` orbit renders of the current object.

    Args:
        n_renders: orbit renders (official: 20; paper: 30 random views).
        radius, fov: the renders' distance to ``target`` and vertical field of view (degrees);
            the start camera gets this field of view at the input's size.
        elevations: elevations (degrees) the renders cycle through.
        up_axis: ``"z"`` or ``"y"``.
        target: the point the renders look at.
        pose_estimator: optional ``(images (B, S, 3, H, W)) -> Cameras (B, S)`` in any frame of its
            own (e.g. VGGT's: first camera = identity, arbitrary scale; intrinsics in pixels of the
            given images), run on the renders followed by the inputs; an input's nearest render is
            the one with the smallest estimated relative rotation. None: nearest by the mean
            absolute difference of 32² thumbnails.
        mapping: with a pose estimator, ``"nearest"`` (official: the nearest render's known pose)
            or ``"align"`` (the similarity transform from the estimator's frame to the object
            frame, fitted on the renders' estimated vs known poses -- rotation by the SVD-projected
            mean of ``R_known R_est^T``, scale and translation by least squares on the camera
            centres -- applied to the inputs' estimated cameras, with the estimator's intrinsics;
            our reading of the paper's "30 renders + inputs into VGGT").
        render: ``(representation, cameras) -> RenderOutput``; default :func:`recon3d.render.render`.
        background: the default renderer's background (the inputs must stand on it).

    ``start(representation, images (B, V, 3, H, W)) -> Cameras (B, V)``; :attr:`last` keeps the
    chosen render index per view.
    """

    def __init__(self, n_renders: int = 20, radius: float = 2.5, fov: float = 40.0, elevations: Sequence[float] = (15.0, 35.0, -5.0),
                 up_axis: str = "z", target: Sequence[float] = (0.0, 0.0, 0.0), pose_estimator: Callable | None = None,
                 render: Callable | None = None, background: Any = "black", render_opts: dict | None = None,
                 mapping: str = "nearest"):
        check_option("n_renders", n_renders, 1, integer=True)
        if mapping not in ("nearest", "align"):
            raise ConfigError(f"mapping: expected 'nearest' or 'align', got {mapping!r}")
        if mapping == "align" and pose_estimator is None:
            raise ConfigError("mapping: 'align' needs a pose_estimator")
        if mapping == "align" and n_renders < 2:
            raise ConfigError("n_renders: 'align' needs at least 2 renders to fit a scale")
        check_option("radius", radius, 0.0, strict=True)
        check_option("fov", fov, 0.0, strict=True)
        if up_axis not in ("z", "y"):
            raise ConfigError(f"up_axis: expected 'z' or 'y', got {up_axis!r}")
        self.n_renders, self.radius, self.fov = int(n_renders), float(radius), float(fov)
        self.elevations = tuple(float(e) for e in elevations) or (0.0,)
        self.up_axis, self.target = up_axis, torch.tensor([float(v) for v in target])
        self.pose_estimator, self.mapping = pose_estimator, mapping
        self.render = render if render is not None else _render_default(background, dict(render_opts or {}))
        self.last: torch.Tensor | None = None

    def orbit(self, width: int, height: int) -> Cameras:
        """The ``(n_renders,)`` render cameras."""
        n = self.n_renders
        az = torch.deg2rad(torch.arange(n, dtype=torch.float32) * (360.0 / n))
        el = torch.deg2rad(torch.tensor([self.elevations[i % len(self.elevations)] for i in range(n)]))
        a, b, c = torch.cos(el) * torch.cos(az), torch.cos(el) * torch.sin(az), torch.sin(el)
        d = torch.stack([a, b, c], -1) if self.up_axis == "z" else torch.stack([b, c, a], -1)
        up = torch.tensor([0.0, 0.0, 1.0]) if self.up_axis == "z" else torch.tensor([0.0, 1.0, 0.0])
        eye = self.target + self.radius * d
        c2w = look_at(eye, self.target.expand_as(eye), up)
        K = intrinsics_from_fov(self.fov, width, height).expand(n, 3, 3).clone()
        return Cameras(c2w, K, width, height)

    @torch.no_grad()
    def __call__(self, representation, images: torch.Tensor) -> Cameras:
        B, V, _, H, W = images.shape
        orbit = self.orbit(W, H).to(images.device)
        S = orbit.batch_shape[0]
        cams = Cameras.stack([orbit] * B)
        renders = self.render(representation, cams)
        rgb = renders.rgb if isinstance(renders, RenderOutput) else renders
        if self.pose_estimator is not None:
            est = self.pose_estimator(torch.cat([rgb.to(images), images], 1))
            if tuple(est.batch_shape) != (B, S + V):
                raise ShapeError(f"pose_estimator: expected Cameras of batch shape ({B}, {S + V}) for {S} renders + {V} inputs, got {list(est.batch_shape)}")
            if self.mapping == "align":
                return _aligned(est, orbit, S, W, H).to(images.device)
            R = est.c2w[..., :3, :3].double()
            rel = R[:, S:, None].transpose(-1, -2) @ R[:, None, :S]  # B V S 3 3
            cos = ((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
            idx = torch.argmax(cos, -1)  # smallest angle
        else:
            thumb = lambda x: torch.nn.functional.interpolate(x.flatten(0, 1), size=(32, 32), mode="area").view(B, -1, 3 * 32 * 32)  # noqa: E731
            d = (thumb(images)[:, :, None] - thumb(rgb.to(images))[:, None]).abs().mean(-1)  # B V S
            idx = torch.argmin(d, -1)
        self.last = idx.cpu()
        c2w = orbit.c2w[idx]  # B V 4 4
        K = orbit.K[idx]
        return Cameras(c2w, K, W, H)


def _aligned(est: Cameras, orbit: Cameras, S: int, W: int, H: int) -> Cameras:
    """Inputs' estimated cameras ``est[:, S:]`` mapped into the object frame by the similarity
    ``x_obj = s R x_est + t`` fitted on the renders (``est[:, :S]`` vs the known ``orbit``)."""
    c2w = est.c2w.detach().double()
    known = orbit.c2w.detach().double().to(c2w.device)  # S 4 4
    out = []
    for b in range(c2w.shape[0]):
        Re, Ce = c2w[b, :S, :3, :3], c2w[b, :S, :3, 3]
        Rk, Ck = known[:, :3, :3], known[:, :3, 3]
        U, _, Vh = torch.linalg.svd((Rk @ Re.transpose(-1, -2)).sum(0))
        D = torch.eye(3, dtype=U.dtype, device=U.device)
        D[2, 2] = torch.sign(torch.linalg.det(U @ Vh))
        R = U @ D @ Vh
        a, k = Ce @ R.T, Ck
        a0, k0 = a - a.mean(0), k - k.mean(0)
        scale = float((a0 * k0).sum() / (a0 * a0).sum().clamp_min(1e-12))
        t = k.mean(0) - scale * a.mean(0)
        M = c2w[b, S:].clone()
        M[:, :3, :3] = R @ c2w[b, S:, :3, :3]
        M[:, :3, 3] = scale * c2w[b, S:, :3, 3] @ R.T + t
        out.append(M)
    K = est.K[:, S:].detach().float()
    return Cameras(torch.stack(out).float(), K, W, H)


@dataclass
class PoseRefinement:
    """Refined cameras ``(B, V)`` and per-view records: ``records[b][v]`` is a list of rounds, each
    ``{"matches", "lifted", "inliers", "status", "rot_change_deg", "trans_change"}``; ``fallback[b][v]``
    is True where no round succeeded (the start camera was kept)."""

    cameras: Cameras
    start: Cameras
    records: list[list[list[dict[str, Any]]]] = field(default_factory=list)
    fallback: list[list[bool]] = field(default_factory=list)


class PoseRefiner(Refiner):
    """Start cameras + ≤ 3 rounds of render-to-input matching and PnP (module docstring).

    Args:
        start: the start-camera source: ``(representation, images (B, V, 3, H, W)) -> Cameras (B, V)``
            (e.g. :class:`NearestRenderStart`, a VGGT wrapper), fixed ``Cameras (B, V)``, or None
            (the reconstruction's predicted cameras, else the views' own).
        matcher: ``(render uint8 (H, W, 3), input uint8, render mask, input mask) -> (pts_render, pts_input)``
            in OpenCV pixel coordinates (default :class:`OpenCVMatcher`).
        rounds: matching + PnP rounds per view (≤ 3 in the paper's setting).
        min_matches, min_inliers: below these a round fails (fallback to the previous camera).
        reprojection_error, iterations, confidence: ``cv2.solvePnPRansac`` (1 px, 2,000, 0.99).
        refine_lm: Levenberg-Marquardt on the RANSAC inliers after EPnP.
        depth_jump: largest relative depth change within a lifted pixel's 3×3 neighbourhood.
        tol_deg, tol_trans: stop a view's rounds once an update is below both.
        render: ``(representation, cameras) -> RenderOutput`` with ``rgb`` and ``depth``;
            default :func:`recon3d.render.render` on ``background`` with ``render_opts``.
        background: the default renderer's background; the input images must stand on it.
    """

    name = "pose"

    def __init__(self, start: Callable | Cameras | None = None, matcher: Matcher | None = None, rounds: int = 3, min_matches: int = 12,
                 min_inliers: int = 10, reprojection_error: float = 1.0, iterations: int = 2000, confidence: float = 0.99,
                 refine_lm: bool = True, depth_jump: float = 0.05, tol_deg: float = 0.05, tol_trans: float = 1e-4,
                 render: Callable | None = None, background: Any = "black", render_opts: dict | None = None):
        check_option("rounds", rounds, 1, integer=True)
        check_option("min_matches", min_matches, 4, integer=True)
        check_option("min_inliers", min_inliers, 4, integer=True)
        check_option("reprojection_error", reprojection_error, 0.0, strict=True)
        check_option("iterations", iterations, 1, integer=True)
        check_option("depth_jump", depth_jump, 0.0, strict=True)
        if not 0 < confidence < 1:
            raise ConfigError(f"confidence: expected a probability in (0, 1), got {confidence!r}")
        self.start = start
        self.matcher = matcher if matcher is not None else OpenCVMatcher()
        self.rounds, self.min_matches, self.min_inliers = int(rounds), int(min_matches), int(min_inliers)
        self.reprojection_error, self.iterations, self.confidence = float(reprojection_error), int(iterations), float(confidence)
        self.refine_lm, self.depth_jump = bool(refine_lm), float(depth_jump)
        self.tol_deg, self.tol_trans = float(tol_deg), float(tol_trans)
        self.render = render if render is not None else _render_default(background, dict(render_opts or {}))

    # ------------------------------------------------------------------ pieces
    def start_cameras(self, representation, images: torch.Tensor, fallback: Cameras | None) -> Cameras:
        if isinstance(self.start, Cameras):
            cams = self.start
        elif callable(self.start):
            cams = self.start(representation, images)
        elif fallback is not None:
            cams = fallback
        else:
            raise ConfigError("PoseRefiner: no start cameras (start is None and neither the reconstruction nor the views have cameras)")
        if not isinstance(cams, Cameras) or tuple(cams.batch_shape) != tuple(images.shape[:2]):
            got = list(cams.batch_shape) if isinstance(cams, Cameras) else type(cams).__name__
            raise ShapeError(f"PoseRefiner.start: expected Cameras of batch shape {list(images.shape[:2])}, got {got}")
        if (cams.height, cams.width) != tuple(images.shape[-2:]):
            raise ShapeError(f"PoseRefiner.start: cameras of {cams.width}x{cams.height} for images of {images.shape[-1]}x{images.shape[-2]}")
        return cams

    def _lift(self, pts: np.ndarray, depth: np.ndarray, cam: Cameras) -> tuple[np.ndarray, np.ndarray]:
        """World points ``(M', 3)`` under render pixels ``pts (M, 2)`` (OpenCV coords) and the
        indices of the matches kept (covered, away from depth edges)."""
        H, W = depth.shape
        u = np.round(pts[:, 0]).astype(np.int64)
        v = np.round(pts[:, 1]).astype(np.int64)
        inside = (u >= 1) & (u < W - 1) & (v >= 1) & (v < H - 1)
        idx = np.nonzero(inside)[0]
        u, v = u[idx], v[idx]
        nb = np.stack([depth[v + dv, u + du] for dv in (-1, 0, 1) for du in (-1, 0, 1)], -1)  # M 9
        d = depth[v, u]
        med = float(np.median(depth[depth > 0])) if (depth > 0).any() else 1.0
        ok = (nb > 0).all(-1) & (np.abs(nb - d[:, None]).max(-1) <= self.depth_jump * med)
        idx, d = idx[ok], d[ok]
        if not len(idx):
            return np.zeros((0, 3)), idx
        pix = torch.from_numpy(pts[idx] + 0.5).to(cam.c2w)[None]  # recon3d pixel coords
        X = cam[None].unproject(pix, torch.from_numpy(d).to(cam.c2w)[None])[0]
        return X.detach().cpu().double().numpy(), idx

    def _pnp(self, X: np.ndarray, x: np.ndarray, K: np.ndarray, w2c: np.ndarray) -> tuple[np.ndarray | None, int, str]:
        import cv2

        rvec0, _ = cv2.Rodrigues(w2c[:3, :3])
        tvec0 = w2c[:3, 3:].copy()
        try:
            ok, rvec, tvec, inl = cv2.solvePnPRansac(X, x, K, None, rvec0.copy(), tvec0.copy(), useExtrinsicGuess=True,
                                                     iterationsCount=self.iterations, reprojectionError=self.reprojection_error,
                                                     confidence=self.confidence, flags=cv2.SOLVEPNP_EPNP)
        except cv2.error as err:
            return None, 0, f"solvePnPRansac error: {str(err).strip().splitlines()[-1]}"
        n_inl = 0 if inl is None else len(inl)
        if not ok or inl is None:
            return None, n_inl, "PnP failed"
        if n_inl < self.min_inliers:
            return None, n_inl, f"{n_inl} inliers < min_inliers={self.min_inliers}"
        inl = inl.reshape(-1)
        if self.refine_lm:
            try:
                rvec, tvec = cv2.solvePnPRefineLM(X[inl], x[inl], K, None, rvec, tvec)
            except cv2.error as err:
                return None, n_inl, f"solvePnPRefineLM error: {str(err).strip().splitlines()[-1]}"
        if not (np.isfinite(rvec).all() and np.isfinite(tvec).all()):
            return None, n_inl, "non-finite pose"
        R, _ = cv2.Rodrigues(rvec)
        out = np.eye(4)
        out[:3, :3], out[:3, 3] = R, tvec.reshape(3)
        z = (X[inl] @ R.T + tvec.reshape(1, 3))[:, 2]
        if np.median(z) <= 0:
            return None, n_inl, "object behind the camera"
        return out, n_inl, "ok"

    # ------------------------------------------------------------------ main entry
    def refine_cameras(self, representation, images: torch.Tensor, cameras: Cameras | None = None,
                       masks: torch.Tensor | None = None) -> PoseRefinement:
        """Refine the cameras of ``images (B, V, 3, H, W)`` against ``representation`` (``B`` objects).

        ``cameras``: the fallback start cameras when ``start`` is None. ``masks (B, V, 1, H, W)``
        limit the input's features to the object. Returns a :class:`PoseRefinement`.
        """
        if images.ndim != 5 or images.shape[2] != 3:
            raise ShapeError(f"images: expected (B, V, 3, H, W), got {list(images.shape)}")
        B, V = images.shape[:2]
        start = self.start_cameras(representation, images, cameras)
        c2w = start.c2w.detach().double().cpu().clone()
        K = start.K.detach().double().cpu()
        records = [[[] for _ in range(V)] for _ in range(B)]
        done = np.zeros((B, V), dtype=bool)
        success = np.zeros((B, V), dtype=bool)
        if start.is_orthographic:
            log.warning("PoseRefiner: orthographic cameras cannot be refined with PnP; keeping the start cameras")
            done[:] = True
        targets = [[_to_uint8(images[b, v]) for v in range(V)] for b in range(B)]
        in_masks = None if masks is None else (masks[:, :, 0].detach().cpu().numpy() > 0.5).astype(np.uint8) * 255
        dev = images.device
        for r in range(self.rounds):
            if done.all():
                break
            cur = Cameras(c2w.float().to(dev), K.float().to(dev), start.width, start.height, start.projection)
            with torch.no_grad():
                out = self.render(representation, cur)
            depth_all = out.depth[:, :, 0].detach().float().cpu().numpy()
            for b in range(B):
                for v in range(V):
                    if done[b, v]:
                        continue
                    rec = {"round": r, "matches": 0, "lifted": 0, "inliers": 0}
                    records[b][v].append(rec)
                    new, status = self._round(out.rgb[b, v], depth_all[b, v], cur[b, v], targets[b][v],
                                              None if in_masks is None else in_masks[b, v], K[b, v].numpy(), rec)
                    rec["status"] = status
                    if new is None:
                        log.warning("PoseRefiner: object %d view %d round %d: %s; keeping the previous camera", b, v, r, status)
                        done[b, v] = True
                        continue
                    old = c2w[b, v].numpy()
                    rec["rot_change_deg"] = rotation_angle_deg(old[:3, :3], new[:3, :3])
                    dist = max(float(np.linalg.norm(old[:3, 3])), 1e-12)
                    rec["trans_change"] = float(np.linalg.norm(new[:3, 3] - old[:3, 3])) / dist
                    c2w[b, v] = torch.from_numpy(new)
                    success[b, v] = True
                    if rec["rot_change_deg"] < self.tol_deg and rec["trans_change"] < self.tol_trans:
                        done[b, v] = True
        refined = Cameras(c2w.float().to(dev), K.float().to(dev), start.width, start.height, start.projection)
        return PoseRefinement(refined, start, records, (~success).tolist())

    def _round(self, rgb: torch.Tensor, depth: np.ndarray, cam: Cameras, target: np.ndarray, in_mask: np.ndarray | None,
               K: np.ndarray, rec: dict) -> tuple[np.ndarray | None, str]:
        """One round for one view: the new c2w ``(4, 4)`` or None, and the status."""
        render_mask = (depth > 0).astype(np.uint8) * 255
        try:
            pr, pi = self.matcher(_to_uint8(rgb), target, render_mask, in_mask)
        except Exception as err:  # a pluggable matcher must not crash sampling
            return None, f"matcher error: {type(err).__name__}: {err}"
        pr, pi = np.asarray(pr, dtype=np.float64).reshape(-1, 2), np.asarray(pi, dtype=np.float64).reshape(-1, 2)
        rec["matches"] = len(pr)
        if len(pr) < self.min_matches:
            return None, f"{len(pr)} matches < min_matches={self.min_matches}"
        X, keep = self._lift(pr, depth, cam)
        rec["lifted"] = len(keep)
        if len(keep) < self.min_matches:
            return None, f"{len(keep)} matches with valid depth < min_matches={self.min_matches}"
        w2c = cam.w2c.detach().double().cpu().numpy()
        new_w2c, n_inl, status = self._pnp(np.ascontiguousarray(X), np.ascontiguousarray(pi[keep] + 0.5), K, w2c)
        rec["inliers"] = n_inl
        if new_w2c is None:
            return None, status
        return np.linalg.inv(new_w2c), status

    # ------------------------------------------------------------------ Refiner interface
    def refine(self, reconstruction: Reconstruction, views: Views) -> Reconstruction:
        """The reconstruction with ``cameras`` set to the refined input cameras (in its frame) and
        the record in ``extras["pose_refinement"]``."""
        with test_time_optimization():
            images = trainable_copy(views.images).float()
            masks = None if views.masks is None else trainable_copy(views.masks).float()
            fb = reconstruction.cameras if reconstruction.cameras is not None else views.cameras
            res = self.refine_cameras(reconstruction.representation, images, fb, masks)
        extras = {**reconstruction.extras, "pose_refinement": {"records": res.records, "fallback": res.fallback,
                                                               "start_c2w": res.start.c2w.detach()}}
        return reconstruction.replace(cameras=res.cameras, extras=extras)

    def summary(self, refined: Reconstruction) -> dict[str, str]:
        rec = refined.get("pose_refinement")
        if not rec:
            return {}
        fb = rec["fallback"][0]
        return {"pose_refined_views": f"{sum(not f for f in fb)}/{len(fb)}"}
