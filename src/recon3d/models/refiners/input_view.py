"""Input-view optimisation (MVBoost §3.4, eq. 7–9) for any reconstruction that holds Gaussians.

Given a reconstruction θ* (a :class:`~recon3d.representations.Gaussians` set per object, found
with ``Reconstruction.find(Gaussians)``, whichever method produced it) and the user's input
image c, the refiner

1. **searches the camera pose** π_opt = argmin_π L(g(θ*, π), c) (eq. 7): a coarse grid of
   orbit cameras (azimuth × elevation × radius offsets around a start pose, all looking at
   ``target``), scored in batches without gradients, then a gradient refinement of the best one;
2. **optimises an additive offset** W on the Gaussian parameters, θ↑ = θ* + W (eq. 8), against
   that one view: W = argmin L(g(θ↑, π_opt), c) (eq. 9), plus a regulariser that keeps the
   renders of other views close to θ*'s own ("other views remain frozen", §3.4).

The loss L is LPIPS (the paper's; VGG, as LGM trains with). LPIPS needs pretrained weights that
are never downloaded (:mod:`recon3d.metrics.lpips`): with ``loss: auto`` and no weights the
refiner logs **one** warning naming the fallback and where to put the files, and uses
``ssim_weight (1 - SSIM) + (1 - ssim_weight) L1`` per image (3DGS's photometric loss, λ 0.2);
``loss: lpips`` refuses without weights, ``loss: ssim_l1`` uses the fallback without a warning.

Choices (the paper gives none of these):

- **Start pose**: the reconstruction's predicted camera of the input view (pose-free methods;
  taken to be in the reconstruction's own frame), else the input view's camera (moved into the
  reconstruction's frame by ``to_world⁻¹`` when the method has one), else the orbit pose
  (``azimuth``, ``elevation``, ``radius``) with intrinsics from ``fovy`` (LGM's 49.1°). Intrinsics
  always come from that camera; the grid only moves the camera centre.
- **Grid**: offsets in degrees (azimuth, elevation) and factors (radius) of the start pose's
  spherical coordinates about ``target`` with ``up_axis`` up; the start camera itself is one more
  candidate. ``*_steps: 1`` searches only the range's middle. Cameras of the grid have no roll.
- **Gradient refinement**: the orbit coordinates themselves, azimuth and elevation (radians)
  and ``log`` radius, from the best candidate's, with Adam (``pose_lr``, ``pose_steps``); with a cosine-decayed
  learning rate; the best pose seen is kept. The camera is ``orbit(az, el, r) · C`` with ``C`` the best candidate's fixed
  offset from the look-at camera at its centre (identity for grid cameras; the start camera's
  roll and off-centre aim for it). Three well-separated directions for an object-centred view;
  a camera-frame se(3) update would add rotation/translation pairs that nearly cancel for a
  small object (a valley Adam follows slowly). Not covered: roll and focal length.
- **What W covers** (``params``): by default colour, opacity and scale, **in unconstrained
  (pre-activation) space**: ``rgb = sigmoid(logit(rgb*) + W_c)``, ``opacity = sigmoid(logit(o*) +
  W_o)`` (``logit`` of values clamped to [1e-6, 1 − 1e-6]), ``scale = exp(log s* + W_s)``. A zero
  W is θ* (to 1e-6), every value of W is a valid Gaussian (no clamping, no dead gradients at the
  bounds), and a step means the same for a colour near 0 or near 1. These change what a
  Gaussian looks like and how far it spreads, not where it is: one image does not constrain
  depth, so positions are left out by default (a reasoned choice; on the test object below
  adding them changed little either way).
  Measured on the test's synthetic object (32², θ* = smooth colour error + 0.02 position
  jitter, 100 steps, SSIM + L1, four held-out views): the defaults lower the input-view loss
  26.9× (PSNR 23.5 → 50.0) with held-out PSNR +0.2 … +2.9 dB; colour + opacity alone 13.5×;
  adding ``means`` 27.2× (+0.4 … +3.2 dB); no regulariser 44× (+0.6 … +8.6 dB). θ*'s errors there
  are the same in every view, so fitting one view helps the others and the regulariser only
  holds that back; it is there for errors one view sees differently (not covered by a test).
  ``means`` (``μ* + W``, world units) and ``quats`` (``q* + W``, renormalised) can be added. SH colours get an offset on the DC
  coefficient only (view-independent colour; the higher bands would fit the input view with
  view-dependent terms other views see differently). For LGM's channels: ``logit(opacity)`` is
  exactly its pre-sigmoid channel and ``logit(rgb)`` twice its pre-tanh one (``0.5 tanh(x) + 0.5
  = sigmoid(2x)``); the scale space differs (log, not softplus⁻¹) because the refiner works on any
  model's Gaussians, not on one network's outputs.
- **Regulariser**: ``reg_views`` orbit cameras at the optimal pose's radius, azimuths spread
  over the arc at least ``reg_min_angle`` degrees from the input view (views closer than that
  see what the input view sees and would contradict its target), elevations cycling through
  ``reg_elevations``; ``reg_weight · (L1(rgb) + L1(alpha))`` against θ*'s renders there, taking
  ``reg_views_per_step`` of them per step in turn. It also resists *good* changes (θ*'s renders
  are wrong where θ* is), so ``reg_weight`` trades input-view fit for held-out stability.
  ``offset_weight · mean(W²)`` is an optional parameter-space penalty on top.
- **Input image**: ``views.images`` come composited on the datamodule's background (where the
  view has alpha); ``background`` must name the same colour (both default to white), since the
  renders are composited on it. Without a mask (``matte: auto``) the image must already stand on
  that background: its border (outer 2 pixels) must lie within ``matte_tolerance`` of the
  background colour for at least ``matte_border`` of its pixels, else one
  :class:`~recon3d.errors.DataError` line says what to provide. This is a check, not a matting
  step: the colour-keyed matte for flat-colour renders is
  :class:`~recon3d.data.formats.ImageFolderDataset`'s ``background`` + ``matte_tolerance``, which
  gives the view its mask before it gets here. ``matte: mask`` demands a mask, ``matte: none``
  fits the image as it is.

Reported (``extras["input_view"]``, per object; :meth:`InputViewRefiner.summary`): the loss's
name, the pose (spherical, c2w, K, where it started), the pose-search history, per-step loss
and PSNR histories, input-view loss / PSNR / LPIPS (when weights exist) before → after at
π_opt, the PSNR of the other input views before → after when there are any (held-out views:
they do not enter the optimisation), and the PSNR of the refined renders against θ*'s at the
regulariser's views (how much the others changed).

Everything runs inside :func:`~recon3d.models.refiners.test_time_optimization`, so it works in
Lightning's ``inference_mode`` predict loop (``recon3d predict`` / ``recon3d export``) through a
method's ``refiners`` list, like :class:`~recon3d.models.refiners.TextureRefiner`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from recon3d.data.batch import Views
from recon3d.data.cameras import Cameras, intrinsics_from_fov, look_at
from recon3d.errors import ConfigError, DataError, ShapeError
from recon3d.metrics.image import psnr, ssim
from recon3d.metrics.lpips import BACKBONE_FILES, HEAD_FILES, LPIPSNet, LPIPSWeightsNotFoundError
from recon3d.models.refiners.base import Refiner, test_time_optimization, trainable_copy
from recon3d.render.gaussians import GaussianRasterizer
from recon3d.render.volume import make_background
from recon3d.representations import Gaussians
from recon3d.representations.reconstruction import Reconstruction
from recon3d.utils.checks import check_option, merge_weights

__all__ = ["InputViewRefiner", "OFFSET_PARAMS", "DEFAULT_LRS"]

log = logging.getLogger(__name__)

#: Gaussian parameters W can cover, and the space each offset lives in (module docstring).
OFFSET_PARAMS = {
    "colors": "logit(rgb) (SH: the DC coefficient)",
    "opacities": "logit(opacity)",
    "scales": "log(scale)",
    "means": "position (world units)",
    "quats": "raw quaternion (renormalised)",
}
#: Adam learning rates of the offsets, per parameter (unit-free spaces; means in world units).
DEFAULT_LRS = {"colors": 0.2, "opacities": 0.2, "scales": 0.01, "means": 1e-3, "quats": 0.01}

_EPS = 1e-6  # clamp before logit: sigmoid(logit(1 - 1e-6)) is 1 - 1e-6 in float32


def _logit(x: torch.Tensor) -> torch.Tensor:
    return torch.logit(x.clamp(_EPS, 1 - _EPS))


def _orthonormal(c2w: torch.Tensor) -> torch.Tensor:
    """``c2w (4, 4)`` with its rotation block re-orthonormalised (Gram-Schmidt on the columns),
    against the float32 drift of ``orbit · C`` products."""
    x = F.normalize(c2w[:3, 0], dim=0)
    y = F.normalize(c2w[:3, 1] - (c2w[:3, 1] @ x) * x, dim=0)
    z = torch.linalg.cross(x, y)
    return torch.cat([torch.stack([x, y, z, c2w[:3, 3]], 1), c2w[3:]], 0)


class _Object:
    """One object's inputs, all ordinary (non-inference) tensors on one device."""

    def __init__(self, gaussians: Gaussians, target: torch.Tensor, camera: Cameras, source: str,
                 others: tuple[torch.Tensor, Cameras] | None):
        self.gaussians, self.target, self.camera, self.source, self.others = gaussians, target, camera, source, others


class InputViewRefiner(Refiner):
    """MVBoost's input-view optimisation on Gaussians (module docstring).

    Args:
        loss: ``"auto"`` (LPIPS when its weights are found, else SSIM + L1 with one warning),
            ``"lpips"`` (refuse without weights), ``"ssim_l1"``.
        lpips_net: ``"vgg"`` (LGM's, default) or ``"alex"``.
        lpips_weights_dir: folder with the LPIPS backbone and heads (:mod:`recon3d.metrics.lpips`).
        lpips_resize: resize renders and target to this square size before LPIPS (LGM: 256).
        ssim_weight: λ of the fallback ``λ (1 - SSIM) + (1 - λ) L1``.
        view: which input view is the user's image.
        pose_search: search the pose (eq. 7); False keeps the start pose.
        azimuth_range, elevation_range: offsets in degrees from the start pose, ``(low, high)``.
        radius_range: factors of the start pose's distance to ``target``, ``(low, high)``.
        azimuth_steps, elevation_steps, radius_steps: grid points per axis (1: the range's middle).
        pose_steps, pose_lr: Adam steps and learning rate (radians; log radius) of the orbit refinement (0: grid only).
        search_chunk: grid cameras rendered per call.
        up_axis: ``"z"`` (recon3d's synthetic set, Objaverse renders) or ``"y"`` (LGM's frame).
        target: the point the grid's cameras look at.
        azimuth, elevation, radius, fovy: start pose and vertical field of view (degrees) when
            the input view has no camera.
        params: Gaussian parameters W covers (:data:`OFFSET_PARAMS`).
        lrs: Adam learning rates per parameter, over :data:`DEFAULT_LRS`.
        steps: optimisation steps of W (eq. 9).
        reg_weight: weight of the other-views regulariser (0: off).
        reg_views: regulariser cameras.
        reg_views_per_step: how many of them each step renders, in turn (None: all); fewer is
            cheaper per step and still covers every one of them every few steps.
        reg_min_angle: smallest azimuth distance (degrees) of a regulariser camera from the input view.
        reg_elevations: elevations (degrees) the regulariser cameras cycle through.
        offset_weight: weight of ``mean(W²)`` (0: off).
        background: render background, ``"white"``, ``"black"``, a grey level or ``[r, g, b]``.
        matte: ``"auto"`` | ``"mask"`` | ``"none"`` (module docstring).
        matte_tolerance, matte_border: the clear-background check of ``matte: auto``.
        backend: Gaussian rasteriser backend (``auto | torch | gsplat``).
    """

    name = "input_view"

    def __init__(
        self,
        loss: Literal["auto", "lpips", "ssim_l1"] = "auto",
        lpips_net: Literal["vgg", "alex"] = "vgg",
        lpips_weights_dir: str | None = None,
        lpips_resize: int | None = None,
        ssim_weight: float = 0.2,
        view: int = 0,
        pose_search: bool = True,
        azimuth_range: tuple[float, float] = (-30.0, 30.0),
        azimuth_steps: int = 7,
        elevation_range: tuple[float, float] = (-15.0, 15.0),
        elevation_steps: int = 5,
        radius_range: tuple[float, float] = (0.9, 1.1),
        radius_steps: int = 3,
        pose_steps: int = 30,
        pose_lr: float = 0.02,
        search_chunk: int = 16,
        up_axis: Literal["z", "y"] = "z",
        target: tuple[float, float, float] = (0.0, 0.0, 0.0),
        azimuth: float = 0.0,
        elevation: float = 0.0,
        radius: float = 1.5,
        fovy: float = 49.1,
        params: Sequence[str] = ("colors", "opacities", "scales"),
        lrs: dict[str, float] | None = None,
        steps: int = 100,
        reg_weight: float = 0.5,
        reg_views: int = 6,
        reg_views_per_step: int | None = 2,
        reg_min_angle: float = 60.0,
        reg_elevations: Sequence[float] = (0.0, 30.0),
        offset_weight: float = 0.0,
        background: str | float | Sequence[float] = "white",
        matte: Literal["auto", "mask", "none"] = "auto",
        matte_tolerance: float = 0.02,
        matte_border: float = 0.9,
        backend: str = "auto",
    ):
        p = "InputViewRefiner"
        for key, value, allowed in (("loss", loss, ("auto", "lpips", "ssim_l1")), ("lpips_net", lpips_net, tuple(BACKBONE_FILES)),
                                    ("up_axis", up_axis, ("z", "y")), ("matte", matte, ("auto", "mask", "none"))):
            if value not in allowed:
                raise ConfigError(f"{p}.{key}: expected one of {list(allowed)}, got {value!r}")
        for key, value in (("azimuth_steps", azimuth_steps), ("elevation_steps", elevation_steps), ("radius_steps", radius_steps),
                           ("search_chunk", search_chunk)):
            check_option(f"{p}.{key}", value, 1, integer=True)
        for key, value in (("pose_steps", pose_steps), ("steps", steps), ("reg_views", reg_views), ("view", view)):
            check_option(f"{p}.{key}", value, 0, integer=True)
        check_option(f"{p}.reg_views_per_step", reg_views_per_step, 1, integer=True, allow_none=True)
        for key, value in (("pose_lr", pose_lr), ("reg_weight", reg_weight), ("offset_weight", offset_weight),
                           ("matte_tolerance", matte_tolerance), ("reg_min_angle", reg_min_angle)):
            check_option(f"{p}.{key}", value, 0)
        check_option(f"{p}.radius", radius, 0, strict=True)
        check_option(f"{p}.lpips_resize", lpips_resize, 32, integer=True, allow_none=True)
        if not 0.0 <= float(ssim_weight) <= 1.0:
            raise ConfigError(f"{p}.ssim_weight: expected a number in [0, 1], got {ssim_weight!r}")
        if not 0.0 < float(matte_border) <= 1.0:
            raise ConfigError(f"{p}.matte_border: expected a fraction in (0, 1], got {matte_border!r}")
        if not 0.0 < float(fovy) < 180.0:
            raise ConfigError(f"{p}.fovy: expected degrees in (0, 180), got {fovy!r}")
        if reg_min_angle > 180:
            raise ConfigError(f"{p}.reg_min_angle: expected degrees in [0, 180], got {reg_min_angle!r}")
        for key, rng in (("azimuth_range", azimuth_range), ("elevation_range", elevation_range), ("radius_range", radius_range)):
            if len(tuple(rng)) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in rng) or rng[0] > rng[1]:
                raise ConfigError(f"{p}.{key}: expected (low, high) with low <= high, got {rng!r}")
        if radius_range[0] <= 0:
            raise ConfigError(f"{p}.radius_range: expected factors > 0, got {radius_range!r}")
        params = tuple(params)
        bad = [k for k in params if k not in OFFSET_PARAMS]
        if bad or len(set(params)) != len(params):
            raise ConfigError(f"{p}.params: expected distinct names from {list(OFFSET_PARAMS)}, got {list(params)}")
        if len(tuple(target)) != 3:
            raise ConfigError(f"{p}.target: expected [x, y, z], got {target!r}")
        if isinstance(background, str) and background not in ("white", "black"):
            raise ConfigError(f"{p}.background: expected 'white', 'black', a grey level or [r, g, b], got {background!r}")
        if isinstance(background, Sequence) and not isinstance(background, str) and len(background) != 3:
            raise ConfigError(f"{p}.background: expected [r, g, b], got {background!r}")
        self.loss, self.lpips_net, self.lpips_weights_dir, self.lpips_resize = loss, lpips_net, lpips_weights_dir, lpips_resize
        self.ssim_weight, self.view = float(ssim_weight), int(view)
        self.pose_search = bool(pose_search)
        self.azimuth_range, self.elevation_range, self.radius_range = tuple(azimuth_range), tuple(elevation_range), tuple(radius_range)
        self.azimuth_steps, self.elevation_steps, self.radius_steps = int(azimuth_steps), int(elevation_steps), int(radius_steps)
        self.pose_steps, self.pose_lr, self.search_chunk = int(pose_steps), float(pose_lr), int(search_chunk)
        self.up_axis, self.target = up_axis, tuple(float(v) for v in target)
        self.azimuth, self.elevation, self.radius, self.fovy = float(azimuth), float(elevation), float(radius), float(fovy)
        self.params = params
        self.lrs = merge_weights(f"{p}.lrs", DEFAULT_LRS, lrs)
        self.steps, self.reg_weight, self.reg_views = int(steps), float(reg_weight), int(reg_views)
        self.reg_views_per_step = None if reg_views_per_step is None else min(int(reg_views_per_step), max(self.reg_views, 1))
        self.reg_min_angle, self.reg_elevations = float(reg_min_angle), tuple(float(e) for e in reg_elevations) or (0.0,)
        self.offset_weight = float(offset_weight)
        self.background = background if isinstance(background, (str, int, float)) else tuple(float(c) for c in background)
        self.matte, self.matte_tolerance, self.matte_border = matte, float(matte_tolerance), float(matte_border)
        self.backend = backend
        self._loss_kind: str | None = None  # resolved on first use: "lpips" or "ssim_l1"
        self._lpips: LPIPSNet | None = None

    # ------------------------------------------------------------------ loss
    def resolve_loss(self) -> str:
        """The loss in use, ``"lpips"`` or ``"ssim_l1"``; loads LPIPS on first call. With
        ``loss: auto`` and no LPIPS weights it logs the fallback once (per refiner)."""
        if self._loss_kind is not None:
            return self._loss_kind
        if self.loss == "ssim_l1":
            self._loss_kind = "ssim_l1"
            return self._loss_kind
        try:
            self._lpips = LPIPSNet(self.lpips_net, pretrained=True, weights_dir=self.lpips_weights_dir)
            self._loss_kind = "lpips"
        except LPIPSWeightsNotFoundError as err:
            if self.loss == "lpips":
                raise LPIPSWeightsNotFoundError(f"InputViewRefiner (loss: lpips): {err}") from None
            log.warning(
                "InputViewRefiner: no LPIPS-%s weights found, so the input-view loss falls back to SSIM + L1 "
                "(%.2f (1 - SSIM) + %.2f L1; the paper's loss is LPIPS). To use LPIPS put %s (torchvision) and %s "
                "(lpips v0.1 heads) in $TORCH_HOME/hub/checkpoints, $RECON3D_LPIPS_DIR or the refiner's lpips_weights_dir; "
                "loss: ssim_l1 chooses the fallback without this warning.",
                self.lpips_net, self.ssim_weight, 1 - self.ssim_weight, BACKBONE_FILES[self.lpips_net], HEAD_FILES[self.lpips_net],
            )
            self._loss_kind = "ssim_l1"
        return self._loss_kind

    def image_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image loss ``(N,)`` of renders ``pred (N, 3, H, W)`` against ``target (1 | N, 3, H, W)``."""
        target = target.expand_as(pred)
        if self.resolve_loss() == "lpips":
            return self._lpips_values(pred, target)
        l1 = (pred - target).abs().flatten(1).mean(1)
        if self.ssim_weight == 0:
            return l1
        return self.ssim_weight * (1 - ssim(pred, target)).to(pred.dtype) + (1 - self.ssim_weight) * l1

    def _lpips_values(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        net = self._lpips.to(pred.device)
        if self.lpips_resize is not None:
            size = (self.lpips_resize, self.lpips_resize)
            pred = F.interpolate(pred, size=size, mode="bilinear", align_corners=False, antialias=True)
            target = F.interpolate(target, size=size, mode="bilinear", align_corners=False, antialias=True)
        return net(pred, target)

    # ------------------------------------------------------------------ Refiner interface
    def refine(self, reconstruction: Reconstruction, views: Views) -> Reconstruction:
        """Refine the Gaussians of every object of ``reconstruction`` on input view ``view`` of
        ``views`` (batch ``(B, V)``, images ``(B, V, 3, H, W)`` in [0, 1]).

        Returns a reconstruction whose Gaussians (primary representation or extra, wherever
        ``find(Gaussians)`` found them; same layout) are θ↑, with ``extras["input_view"]`` (module
        docstring). Other representations are kept as they are (a mesh made from θ* stays θ*'s).
        """
        gs = reconstruction.find(Gaussians)
        if gs is None:
            kinds = [type(reconstruction.representation).__name__, *(f"{k}: {type(v).__name__}" for k, v in reconstruction.extras.items())]
            raise ConfigError(f"InputViewRefiner: the reconstruction holds no Gaussians ({', '.join(kinds)}); it refines Gaussian splats only")
        B = len(reconstruction)
        if gs.batch_size != B or views.images.ndim != 5 or views.images.shape[0] != B:
            raise ShapeError(f"InputViewRefiner: {B} objects, {gs.batch_size} Gaussian sets and views of shape {list(views.images.shape)}; "
                             "expected one set and views (B, V, 3, H, W) per object")
        if not self.view < views.images.shape[1]:
            raise ConfigError(f"InputViewRefiner.view: {self.view} but the objects have {views.images.shape[1]} input view(s)")
        kind = self.resolve_loss()
        results, parts = [], []
        with test_time_optimization():
            for b in range(B):
                g = gs[b]
                if g.is_packed and int(g.counts[0]) == 0:  # nothing to refine for an object without Gaussians
                    parts.append(g)
                    results.append(None)
                    continue
                obj = self._prepare(g, reconstruction, views, b)
                refined, record = self._refine_object(obj)
                parts.append(refined.packed() if g.is_packed else refined)
                results.append(record)
        out = Gaussians.from_list(parts) if gs.is_packed else _cat_dense(parts)
        record = _collate(results, kind, views.images.device)
        extras = {**reconstruction.extras, "input_view": record}
        if reconstruction.representation is gs:
            return reconstruction.replace(representation=out, extras=extras)
        key = next(k for k, v in reconstruction.extras.items() if v is gs)
        extras[key] = out
        return reconstruction.replace(extras=extras)

    def summary(self, refined: Reconstruction) -> dict[str, str]:
        """The first object's numbers as ``{name: "before->after"}`` lines for the export list."""
        rec = refined.get("input_view")
        if not rec or rec["before"][0] is None:
            return {}
        bef, aft, pose = rec["before"][0], rec["after"][0], rec["pose"][0]
        out = {
            "input_view_loss": f"{rec['loss']} {bef['loss']:.4f}->{aft['loss']:.4f}",
            "input_view_psnr": f"{bef['psnr']:.2f}->{aft['psnr']:.2f}",
            "input_view_lpips": f"{bef['lpips']:.4f}->{aft['lpips']:.4f}" if bef["lpips"] is not None else "n/a (no LPIPS weights; ssim_l1 loss)",
            "input_view_pose": f"azimuth {pose['azimuth']:.1f} elevation {pose['elevation']:.1f} radius {pose['radius']:.3f} (from the {pose['source']})",
        }
        held = rec["heldout_psnr"][0]
        if held is not None:
            out["heldout_psnr"] = f"{held[0]:.2f}->{held[1]:.2f}"
        if rec["reg_psnr"][0] is not None:
            out["reg_views_psnr"] = f"{rec['reg_psnr'][0]:.2f} (refined vs unrefined renders)"
        return out

    # ------------------------------------------------------------------ one object
    def _background_rgb(self, device, dtype) -> torch.Tensor:
        bg = torch.tensor(self.background) if isinstance(self.background, tuple) else self.background
        return make_background(bg, (1,), device, dtype)[0]

    def _prepare(self, g: Gaussians, rec: Reconstruction, views: Views, b: int) -> _Object:
        """Ordinary copies of object ``b``'s Gaussians, target image, start camera and other views."""
        oid = rec.object_ids[b]
        g = g.to_dense() if g.is_packed else g
        g = Gaussians(*(trainable_copy(t).float() for t in (g.means, g.quats, g.scales, g.opacities, g.colors)), g.sh_degree)
        dev = g.means.device
        images = trainable_copy(views.images[b]).float().to(dev)  # V 3 H W
        masks = None if views.masks is None else trainable_copy(views.masks[b]).float().to(dev)
        H, W = images.shape[-2:]
        kind = self.resolve_loss()
        if kind == "ssim_l1" and min(H, W) <= 10 or kind == "lpips" and self.lpips_resize is None and min(H, W) < 32:
            need = "larger than 10x10 for SSIM" if kind == "ssim_l1" else "at least 32x32 for LPIPS (or set lpips_resize)"
            raise ShapeError(f"InputViewRefiner: input images of {W}x{H}; the {kind} loss needs images {need}")
        target = self._target(images[self.view], None if masks is None else masks[self.view], oid)
        cams = self._frame_cameras(rec, views, b, dev)
        others = None
        if cams is None:
            eye = self._eye(torch.tensor([self.azimuth]), torch.tensor([self.elevation]), torch.tensor([self.radius]))
            c2w = look_at(eye, torch.tensor(self.target), self._up())
            K = intrinsics_from_fov(self.fovy, W, H)[None]
            camera, source = Cameras(c2w[None].to(dev), K[None].to(dev), W, H), "configured orbit pose"
        else:
            if (cams.height, cams.width) != (H, W):
                raise ShapeError(f"InputViewRefiner: cameras of {cams.width}x{cams.height} for input images of {W}x{H}")
            camera = cams[:, self.view : self.view + 1]
            source = "predicted camera" if rec.cameras is not None else "input camera"
            keep = [v for v in range(images.shape[0]) if v != self.view]
            if keep:  # the other input views: held out from the optimisation, scored before -> after
                others = (images[keep], cams[:, keep])
        return _Object(g, target, camera, source, others)

    def _target(self, img: torch.Tensor, mask: torch.Tensor | None, oid: str) -> torch.Tensor:
        """The image to fit, ``(1, 3, H, W)`` (module docstring). A masked view is already
        composited (on the datamodule's background, which ``background`` must name); one without
        a mask must show a clear background unless ``matte: none``."""
        if self.matte == "none" or mask is not None:
            return img[None]
        bg = self._background_rgb(img.device, img.dtype)[:, None, None]
        where = f"input view {self.view} of object {oid!r}"
        if self.matte == "mask":
            raise DataError(where, "no mask (InputViewRefiner matte: mask); give an RGBA image or a mask file "
                            "(ImageFolderDataset mask_dir), or use matte: auto for images on a plain background")
        border = torch.ones(img.shape[-2:], dtype=torch.bool, device=img.device)
        border[2:-2, 2:-2] = False
        on_bg = ((img - bg).abs().amax(0) <= self.matte_tolerance)[border].float().mean()
        if float(on_bg) < self.matte_border:
            raise DataError(where, f"no mask and no clear background: {100 * float(on_bg):.0f}% of the image border is within "
                            f"{self.matte_tolerance:g} of the render background {bg.flatten().tolist()} (needs {100 * self.matte_border:.0f}%); "
                            "give an RGBA image or a mask (ImageFolderDataset mask_dir, or its background + matte_tolerance to key a "
                            "flat colour), or set the refiner's matte: none to fit the image as it is")
        return img[None]

    def _frame_cameras(self, rec: Reconstruction, views: Views, b: int, dev) -> Cameras | None:
        """Object ``b``'s input cameras ``(1, V)`` in the reconstruction's frame, or None."""
        if rec.cameras is not None:  # predicted by a pose-free method, in its own frame
            c = rec.cameras[b : b + 1]
            return Cameras(trainable_copy(c.c2w).float().to(dev), trainable_copy(c.K).float().to(dev), c.width, c.height, c.projection)
        if views.cameras is None:
            return None
        c = views.cameras[b : b + 1]
        c2w, K = trainable_copy(c.c2w).float().to(dev), trainable_copy(c.K).float().to(dev)
        if rec.to_world is not None:
            c2w, K = _to_canonical(c2w, K, trainable_copy(rec.to_world[b]).float().to(dev), c.is_orthographic)
        return Cameras(c2w, K, c.width, c.height, c.projection)

    # ------------------------------------------------------------------ orbit geometry
    def _up(self) -> torch.Tensor:
        return torch.tensor([0.0, 0.0, 1.0]) if self.up_axis == "z" else torch.tensor([0.0, 1.0, 0.0])

    def _eye(self, az: torch.Tensor, el: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Camera centres ``(N, 3)`` at azimuth/elevation (degrees)/distance about ``target``
        (the parameterisation of :func:`recon3d.data.cameras.orbit_cameras`)."""
        a, e = torch.deg2rad(az.float()), torch.deg2rad(el.float())
        u, v, w = r * torch.cos(e) * torch.cos(a), r * torch.cos(e) * torch.sin(a), r * torch.sin(e)
        off = torch.stack([u, v, w], -1) if self.up_axis == "z" else torch.stack([v, w, u], -1)
        return off + torch.tensor(self.target)

    def spherical(self, center: torch.Tensor) -> tuple[float, float, float]:
        """``(azimuth, elevation, radius)`` (degrees, world units) of a camera centre ``(3,)`` about ``target``."""
        d = center.detach().double().cpu() - torch.tensor(self.target, dtype=torch.float64)
        u, v, w = (d[0], d[1], d[2]) if self.up_axis == "z" else (d[2], d[0], d[1])
        r = float(d.norm())
        el = math.degrees(math.asin(max(-1.0, min(1.0, float(w) / max(r, 1e-12)))))
        return math.degrees(math.atan2(float(v), float(u))), el, r

    def _grid(self, start: Cameras) -> Cameras:
        """Candidate cameras ``(1, N)``: the start camera, then the orbit grid about it."""
        az0, el0, r0 = self.spherical(start.c2w[0, 0, :3, 3])
        axis = lambda rng, n: torch.linspace(rng[0], rng[1], n) if n > 1 else torch.tensor([0.5 * (rng[0] + rng[1])])  # noqa: E731
        daz, delv, fr = torch.meshgrid(axis(self.azimuth_range, self.azimuth_steps), axis(self.elevation_range, self.elevation_steps),
                                       axis(self.radius_range, self.radius_steps), indexing="ij")
        el = (el0 + delv.flatten()).clamp(-89.0, 89.0)  # look_at has no roll at the poles
        eye = self._eye(az0 + daz.flatten(), el, r0 * fr.flatten())
        c2w = look_at(eye, torch.tensor(self.target).expand_as(eye), self._up()).to(start.c2w)
        c2w = torch.cat([start.c2w[0], c2w], 0)
        K = start.K[0, :1].expand(c2w.shape[0], 3, 3)
        return Cameras(c2w[None], K[None].clone(), start.width, start.height, start.projection)

    def _reg_cameras(self, pose: Cameras) -> Cameras | None:
        """The regulariser's ``reg_views`` orbit cameras ``(1, R)`` about the optimal pose."""
        if self.reg_views == 0 or self.reg_weight == 0:
            return None
        az0, _, r0 = self.spherical(pose.c2w[0, 0, :3, 3])
        n, m = self.reg_views, self.reg_min_angle
        az = az0 + (torch.tensor([180.0]) if n == 1 else torch.linspace(m, 360.0 - m, n))
        el = torch.tensor([self.reg_elevations[i % len(self.reg_elevations)] for i in range(n)]).clamp(-89.0, 89.0)
        eye = self._eye(az, el, torch.full((n,), r0))
        c2w = look_at(eye, torch.tensor(self.target).expand_as(eye), self._up()).to(pose.c2w)
        K = pose.K[0, :1].expand(n, 3, 3)
        return Cameras(c2w[None], K[None].clone(), pose.width, pose.height, pose.projection)

    def _orbit_c2w(self, az: torch.Tensor, el: torch.Tensor, r: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Differentiable look-at ``c2w (4, 4)`` at azimuth/elevation ``az, el`` (radians), distance
        ``r`` about ``target`` (the convention of :func:`recon3d.data.cameras.look_at`)."""
        u, v, w = r * torch.cos(el) * torch.cos(az), r * torch.cos(el) * torch.sin(az), r * torch.sin(el)
        off = torch.stack([u, v, w]) if self.up_axis == "z" else torch.stack([v, w, u])
        up = self._up().to(target)
        z = -off / off.norm()
        xa = torch.linalg.cross(z, up)
        xa = xa / xa.norm()
        ya = torch.linalg.cross(z, xa)
        top = torch.stack([xa, ya, z, target + off], 1)
        return torch.cat([top, torch.tensor([[0.0, 0.0, 0.0, 1.0]]).to(target)], 0)

    # ------------------------------------------------------------------ eq. 7: the pose
    def search_pose(self, gaussians: Gaussians, target: torch.Tensor, start: Cameras) -> tuple[Cameras, dict[str, Any]]:
        """π_opt for one object: ``gaussians`` (dense, one set), ``target (1, 3, H, W)``, ``start``
        camera ``(1, 1)``. Returns the camera ``(1, 1)`` and the search record (losses at the
        start, best grid point, each refinement step). Call inside :func:`test_time_optimization`."""
        rast = GaussianRasterizer(self.backend, device=gaussians.means.device, background=self._background_rgb(target.device, target.dtype))
        g = gaussians.detach()
        with torch.no_grad():
            grid = self._grid(start) if self.pose_search else start
            N = grid.batch_shape[1]
            losses = torch.cat([self.image_loss(rast(g, grid[:, i : i + self.search_chunk]).rgb[0], target)
                                for i in range(0, N, self.search_chunk)])
        best = int(torch.argmin(losses))
        record: dict[str, Any] = {"start_loss": float(losses[0]), "grid_size": N, "grid_best_loss": float(losses[best]), "steps": []}
        c2w0, K = grid.c2w[0, best].detach(), grid.K[0, best : best + 1].detach()
        best_loss, best_c2w = float(losses[best]), c2w0
        if self.pose_search and self.pose_steps > 0:
            az0, el0, r0 = self.spherical(c2w0[:3, 3])
            tgt = torch.tensor(self.target).to(c2w0)
            at = lambda a, e, lr: self._orbit_c2w(a, e, torch.exp(lr), tgt)  # noqa: E731
            sph = torch.tensor([math.radians(az0), math.radians(el0), math.log(r0)], device=c2w0.device, dtype=c2w0.dtype)
            offset = torch.linalg.inv(at(*sph)) @ c2w0  # C: identity for a grid camera
            x = sph.clone().requires_grad_(True)
            opt = torch.optim.Adam([x], lr=self.pose_lr)
            # Cosine decay: Adam's steps of pose_lr overshoot the minimum at the end otherwise.
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / self.pose_steps)))
            for i in range(self.pose_steps + 1):
                with torch.set_grad_enabled(i < self.pose_steps):
                    c2w = _orthonormal(at(x[0], x[1], x[2]) @ offset)
                    loss = self.image_loss(rast(g, Cameras(c2w[None, None], K[None], grid.width, grid.height, grid.projection)).rgb[0], target)[0]
                value = float(loss.detach())
                record["steps"].append(value)
                if value < best_loss:
                    best_loss, best_c2w = value, c2w.detach()
                if i < self.pose_steps:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
        record["loss"] = best_loss
        return Cameras(best_c2w[None, None], K[None], grid.width, grid.height, grid.projection), record

    # ------------------------------------------------------------------ eq. 8-9: the offsets
    def _refine_object(self, obj: _Object) -> tuple[Gaussians, dict[str, Any]]:
        dev, dt = obj.target.device, obj.target.dtype
        rast = GaussianRasterizer(self.backend, device=dev, background=self._background_rgb(dev, dt))
        pose, search = self.search_pose(obj.gaussians, obj.target, obj.camera)
        g0 = obj.gaussians
        reg = self._reg_cameras(pose)
        with torch.no_grad():
            ref = None if reg is None else rast(g0, reg)
        R = 0 if reg is None else reg.batch_shape[1]
        k = R if self.reg_views_per_step is None else self.reg_views_per_step
        base = _unconstrained(g0)
        W = {n: torch.zeros_like(base[n], requires_grad=True) for n in self.params}
        opt = torch.optim.Adam([{"params": [W[n]], "lr": self.lrs[n]} for n in self.params]) if W else None
        losses, psnrs = [], []
        for step in range(self.steps if W else 0):
            # The regulariser's views in turn, k per step (all of them when k == R).
            pick = [(step * k + j) % R for j in range(k)] if R else []
            cams = pose if not pick else Cameras.cat([pose, reg[:, pick]], 1)
            out = rast(_constrained(base, W, g0.sh_degree), cams)
            img = self.image_loss(out.rgb[0, :1], obj.target)[0]
            total = img
            if pick:
                d_rgb = (out.rgb[:, 1:] - ref.rgb[:, pick]).abs().mean()
                total = total + self.reg_weight * (d_rgb + (out.alpha[:, 1:] - ref.alpha[:, pick]).abs().mean())
            if self.offset_weight > 0:
                total = total + self.offset_weight * sum(w.square().mean() for w in W.values())
            losses.append(float(img.detach()))
            psnrs.append(float(psnr(out.rgb[0, :1].detach(), obj.target)[0]))
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
        with torch.no_grad():
            refined = _constrained(base, W, g0.sh_degree)
            before, after = self._scores(rast, g0, pose, obj.target), self._scores(rast, refined, pose, obj.target)
            losses.append(after["loss"])
            psnrs.append(after["psnr"])
            held = None
            if obj.others is not None:
                imgs, ocams = obj.others
                held = (float(psnr(rast(g0, ocams).rgb[0], imgs).mean()), float(psnr(rast(refined, ocams).rgb[0], imgs).mean()))
            reg_psnr = None if reg is None else float(psnr(rast(refined, reg).rgb[0], ref.rgb[0]).mean())
        az, el, r = self.spherical(pose.c2w[0, 0, :3, 3])
        record = {
            "pose": {"azimuth": az, "elevation": el, "radius": r, "source": obj.source},
            "c2w": pose.c2w[0, 0].detach(), "K": pose.K[0, 0].detach(),
            "pose_search": search, "loss_history": losses, "psnr_history": psnrs,
            "before": before, "after": after, "heldout_psnr": held, "reg_psnr": reg_psnr,
        }
        return refined.detach(), record

    def _scores(self, rast, g: Gaussians, pose: Cameras, target: torch.Tensor) -> dict[str, float | None]:
        rgb = rast(g, pose).rgb[0]
        lp = float(self._lpips_values(rgb, target)[0]) if self._loss_kind == "lpips" else None
        return {"loss": float(self.image_loss(rgb, target)[0]), "psnr": float(psnr(rgb, target)[0]), "lpips": lp}


# ---------------------------------------------------------------------- helpers
def _unconstrained(g: Gaussians) -> dict[str, torch.Tensor]:
    """θ* in the spaces W is added in (:data:`OFFSET_PARAMS`), dense ``(1, N, ...)``."""
    colors = g.colors if g.sh_degree is not None else _logit(g.colors)
    return {"means": g.means, "quats": g.quats, "scales": torch.log(g.scales.clamp_min(1e-12)), "opacities": _logit(g.opacities), "colors": colors}


def _constrained(base: dict[str, torch.Tensor], W: dict[str, torch.Tensor], sh_degree: int | None) -> Gaussians:
    """θ* + W back to activated :class:`Gaussians`."""
    x = {k: base[k] + W[k] if k in W and k != "colors" else base[k] for k in base}
    colors = base["colors"]
    if "colors" in W:
        if sh_degree is None:
            colors = colors + W["colors"]
        else:  # the DC band only (module docstring); W["colors"] has the SH shape, the rest of it is unused
            colors = torch.cat([colors[..., :1, :] + W["colors"][..., :1, :], colors[..., 1:, :]], -2)
    colors = torch.sigmoid(colors) if sh_degree is None else colors
    quats = F.normalize(x["quats"], dim=-1) if "quats" in W else x["quats"]
    return Gaussians(x["means"], quats, torch.exp(x["scales"]), torch.sigmoid(x["opacities"]), colors, sh_degree)


def _to_canonical(c2w: torch.Tensor, K: torch.Tensor, to_world: torch.Tensor, orthographic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """World-frame cameras ``c2w (1, V, 4, 4)``, ``K (1, V, 3, 3)`` in the frame ``to_world (4, 4)``
    maps to the world (a rigid transform times a uniform scale ``s``): ``c2w' = to_world⁻¹ c2w``
    with the rotation renormalised; an orthographic camera's pixels per unit are divided by the
    world-to-canonical scale."""
    M = torch.linalg.inv(to_world.double())
    A = M[:3, :3]
    s = torch.linalg.det(A).abs().pow(1 / 3)  # world -> canonical scale
    out = (M @ c2w.double()).clone()
    out[..., :3, :3] = out[..., :3, :3] / s
    K = K.clone()
    if orthographic:
        K[..., :2, :2] = K[..., :2, :2] / s.to(K)
    return out.to(c2w.dtype), K


def _cat_dense(parts: list[Gaussians]) -> Gaussians:
    return Gaussians(*(torch.cat([getattr(p, k) for p in parts]) for k in ("means", "quats", "scales", "opacities", "colors")), parts[0].sh_degree)


def _collate(results: list[dict | None], kind: str, device) -> dict[str, Any]:
    """Per-object records as one dict of per-object lists / ``(B, ...)`` tensors (so that
    ``Reconstruction.select`` splits it); objects without Gaussians have None entries."""
    keys = ("pose", "pose_search", "loss_history", "psnr_history", "before", "after", "heldout_psnr", "reg_psnr")
    out: dict[str, Any] = {"loss": kind, **{k: [None if r is None else r[k] for r in results] for k in keys}}
    eye4, eye3 = torch.eye(4, device=device), torch.eye(3, device=device)
    out["c2w"] = torch.stack([eye4 if r is None else r["c2w"].to(device) for r in results])
    out["K"] = torch.stack([eye3 if r is None else r["K"].to(device) for r in results])
    return out
