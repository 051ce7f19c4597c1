"""Normalisation and rigid / similarity alignment of point clouds before geometry metrics.

- :func:`normalize_to_cube`: re-centre and scale a cloud the way a protocol does (bounding box
  into ``[-1, 1]^3``, or centroid + unit sphere).
- :func:`icp`: point-to-point ICP (Besl & McKay 1992) with the closed-form Umeyama (1991) update;
  ``with_scale=True`` gives similarity ICP.
- :func:`rotation_grid` / :func:`principal_frame` / :func:`align_points`: a coarse search over
  rotations (the 24 rotations of the cube, optionally times extra yaw steps, and the same 24
  between the clouds' principal axes) with a short ICP from each, then a full ICP from the best
  one; this escapes the wrong local minima ICP falls into on symmetric objects, and the
  principal-axis starts make the result independent of how the source was turned.

All functions take ``(N, 3)`` tensors on any device; nearest neighbours use
:func:`recon3d.metrics.geometry.nearest_neighbors` (KD-tree on CPU, chunked torch elsewhere).
Transforms are ``(4, 4)`` matrices that map the *source* (prediction) onto the *target*, with the
scale folded into the rotation block (``x' = s R x + t``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from recon3d.utils.checks import check_shape

__all__ = ["normalize_to_cube", "umeyama", "icp", "ICPResult", "rotation_grid", "principal_frame", "align_points", "apply_transform"]


def normalize_to_cube(points: Tensor, mode: Literal["bbox", "sphere", "none"] = "bbox", extent: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Re-centre and scale a cloud.

    Args:
        points: ``(N, 3)``.
        mode: ``"bbox"``: bounding-box centre to the origin, longest half-side to ``extent`` (so the
            cloud fits ``[-extent, extent]^3``, GTR/InstantMesh style); ``"sphere"``: centroid to the
            origin, farthest point at radius ``extent``; ``"none"``: unchanged.
        extent: half-size of the target cube (1 for ``[-1, 1]^3``).

    Returns:
        ``(normalised (N, 3), center (3,), scale ())`` with ``normalised = (points - center) * scale``.
    """
    check_shape(points, "N 3", "points")
    if mode == "none" or points.shape[0] == 0:
        return points, points.new_zeros(3), points.new_ones(())
    if mode == "bbox":
        lo, hi = points.min(0).values, points.max(0).values
        center = (lo + hi) / 2
        half = ((hi - lo) / 2).max()
    elif mode == "sphere":
        center = points.mean(0)
        half = (points - center).norm(dim=-1).max()
    else:
        raise ValueError(f"mode: expected 'bbox', 'sphere' or 'none', got {mode!r}")
    scale = extent / half.clamp_min(1e-12)
    return (points - center) * scale, center, scale


def apply_transform(points: Tensor, transform: Tensor) -> Tensor:
    """``points (N, 3)``, ``transform (4, 4)`` -> ``(N, 3)``."""
    return points @ transform[:3, :3].T + transform[:3, 3]


def umeyama(src: Tensor, dst: Tensor, with_scale: bool = False, weights: Tensor | None = None) -> Tensor:
    """Least-squares ``(4, 4)`` similarity (or rigid) transform mapping ``src (N, 3)`` onto ``dst (N, 3)``."""
    if weights is None:
        weights = src.new_ones(src.shape[0])
    w = weights / weights.sum().clamp_min(1e-12)
    mu_s = (w[:, None] * src).sum(0)
    mu_d = (w[:, None] * dst).sum(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = (w[:, None] * xd).T @ xs  # (3, 3)
    u, sv, vh = torch.linalg.svd(cov)
    d = torch.ones(3, dtype=src.dtype, device=src.device)
    if torch.det(u @ vh) < 0:
        d[2] = -1
    rot = u @ torch.diag(d) @ vh
    scale = (sv * d).sum() / (w * xs.square().sum(-1)).sum().clamp_min(1e-12) if with_scale else src.new_ones(())
    out = torch.eye(4, dtype=src.dtype, device=src.device)
    out[:3, :3] = scale * rot
    out[:3, 3] = mu_d - scale * rot @ mu_s
    return out


@dataclass
class ICPResult:
    """Result of :func:`icp`: ``transform (4, 4)`` (source -> target), ``rmse`` of the last
    correspondences, ``mean_dist`` (mean source->target nearest distance after alignment), ``iters``."""

    transform: Tensor
    rmse: float
    mean_dist: float
    iters: int


def icp(
    src: Tensor,
    dst: Tensor,
    init: Tensor | None = None,
    max_iters: int = 50,
    tol: float = 1e-7,
    with_scale: bool = False,
    backend: str = "auto",
) -> ICPResult:
    """Point-to-point ICP aligning ``src (N, 3)`` onto ``dst (M, 3)``.

    Each iteration matches every transformed source point to its nearest target point and
    re-solves the transform from the *original* source points (Umeyama), until the mean distance
    improves by less than ``tol``. ``init`` is an optional ``(4, 4)`` starting transform.
    """
    dims: dict = {}
    check_shape(src, "N 3", "src", dims)
    check_shape(dst, "M 3", "dst", dims)
    from recon3d.metrics.geometry import nearest_neighbors

    src64, dst64 = src.double(), dst.double()
    if backend == "auto":
        backend = "kdtree" if src.device.type == "cpu" else "torch"
    if backend == "kdtree":  # build the target's tree once, not once per iteration
        import numpy as np
        from scipy.spatial import cKDTree

        tree = cKDTree(dst64.detach().cpu().numpy())

        def nearest_neighbors(x: Tensor, y: Tensor, backend: str) -> tuple[Tensor, Tensor]:  # noqa: F811
            _, i = tree.query(x.detach().cpu().numpy(), k=1)
            idx = torch.from_numpy(np.asarray(i, dtype=np.int64)).to(x.device)
            return (x - y[idx]).norm(dim=-1), idx

    t = torch.eye(4, dtype=torch.float64, device=src.device) if init is None else init.to(src.device, torch.float64)
    prev = math.inf
    iters = 0
    for _ in range(max_iters):
        iters += 1
        moved = apply_transform(src64, t)
        dist, idx = nearest_neighbors(moved, dst64, backend=backend)
        t = umeyama(src64, dst64[idx], with_scale=with_scale)
        cur = float(dist.mean())
        if prev - cur < tol:
            break
        prev = cur
    moved = apply_transform(src64, t)
    dist, _ = nearest_neighbors(moved, dst64, backend=backend)
    return ICPResult(t.to(src.dtype), float(dist.square().mean().sqrt()), float(dist.mean()), iters)


def rotation_grid(yaw_steps: int = 1, dtype: torch.dtype = torch.float64) -> Tensor:
    """Coarse set of rotations ``(K, 3, 3)``: the 24 proper rotations of the cube, each composed
    with ``yaw_steps`` rotations about the z axis by ``90° / yaw_steps`` (``K = 24 * yaw_steps``)."""
    mats = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((-1.0, 1.0), repeat=3):
            m = torch.zeros(3, 3, dtype=dtype)
            for r, c in enumerate(perm):
                m[r, c] = signs[r]
            if torch.det(m) > 0:
                mats.append(m)
    base = torch.stack(mats)
    if yaw_steps <= 1:
        return base
    out = []
    for k in range(yaw_steps):
        a = (math.pi / 2) * k / yaw_steps
        c, s = math.cos(a), math.sin(a)
        yaw = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=dtype)
        out.append(base @ yaw)
    return torch.cat(out)


def principal_frame(points: Tensor) -> tuple[Tensor, Tensor]:
    """Principal axes of ``points (N, 3)`` about their centroid: ``(frame (3, 3), variances (3,))``.

    The axes are the columns of a proper rotation (largest variance first; the last axis is flipped
    if needed so that ``det = +1``). Each axis is defined up to its sign only, so a rotated copy's
    frame is ``R @ frame @ D`` with ``D`` a diagonal sign matrix of determinant 1, one of the 24
    rotations of :func:`rotation_grid`; the axes are ill-defined where two variances are close."""
    x = points.double() - points.double().mean(0)
    val, vec = torch.linalg.eigh(x.T @ x / max(1, x.shape[0]))
    frame = vec.flip(-1).clone()  # eigh sorts ascending
    if torch.det(frame) < 0:
        frame[:, 2] = -frame[:, 2]
    return frame, val.flip(-1)


def _axes_ambiguous(var: Tensor, gap: float) -> bool:
    """Two principal variances ``(3,)`` (descending) closer than ``gap`` times the largest."""
    return bool(((var[:-1] - var[1:]) < gap * var[0].clamp_min(1e-300)).any())


def align_points(
    src: Tensor,
    dst: Tensor,
    mode: Literal["none", "icp", "icp_scale"] = "icp",
    rotation_search: bool = True,
    yaw_steps: int = 1,
    search_points: int = 2000,
    search_iters: int = 10,
    max_iters: int = 100,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    axis_gap: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Align ``src (N, 3)`` onto ``dst (M, 3)``; returns ``(aligned src (N, 3), transform (4, 4))``.

    With ``rotation_search``, ICP is started from a set of rotations about the centroids: the 24
    rotations ``P`` of :func:`rotation_grid` between the clouds' principal frames,
    ``F_dst P F_src^T`` (GAPS ``mshalign``'s PCA starts with all axis swaps and flips). These turn
    with ``src``: a rotated ``src`` gets the same starts, rotated, so its result does not depend on
    the rotation (the grid about fixed axes alone leaves up to ~60 degrees to ICP, which on an
    elongated object often ends half a turn off). Where either cloud's principal axes are
    ill-defined (two variances within ``axis_gap`` of the largest: a cube, a sphere, a cylinder)
    or ``yaw_steps > 1``, the rotations of ``rotation_grid(yaw_steps)`` about fixed axes are tried
    as well (right when ``src`` is already roughly in ``dst``'s frame or off by quarter turns).
    Each start runs a ``search_iters``-step ICP on ``search_points`` random points of each cloud;
    the one with the lowest mean distance runs a full ICP on all points (up to ``max_iters`` steps:
    point-to-point ICP creeps along nearly flat directions, and two starts stopped after 50 steps
    can still differ by ~1 % in CD).

    ``mode="icp_scale"`` (similarity ICP) starts from the scale that matches the clouds' RMS radii
    about their centroids (unchanged by any rotation of ``src``), keeps that scale fixed during the
    rotation search, and lets ICP fit it only in the final run from the best start: a free scale
    in the short, badly started search runs could shrink ``src`` onto a patch of ``dst`` (its
    one-sided mean distance then looks best).
    """
    dims: dict = {}
    check_shape(src, "N 3", "src", dims)
    check_shape(dst, "M 3", "dst", dims)
    if mode == "none":
        return src, torch.eye(4, dtype=src.dtype, device=src.device)
    if mode not in ("icp", "icp_scale"):
        raise ValueError(f"mode: expected 'none', 'icp' or 'icp_scale', got {mode!r}")
    with_scale = mode == "icp_scale"
    src64, dst64 = src.double(), dst.double()
    cs, cd = src64.mean(0), dst64.mean(0)
    s0 = 1.0
    if with_scale:
        rms_src = (src64 - cs).square().sum(-1).mean().sqrt()
        rms_dst = (dst64 - cd).square().sum(-1).mean().sqrt()
        s0 = float(rms_dst / rms_src.clamp_min(1e-12))
    init: Tensor | None = None
    if with_scale:
        init = torch.eye(4, dtype=torch.float64, device=src.device)
        init[:3, :3] *= s0
        init[:3, 3] = cd - s0 * cs
    if rotation_search:
        def subset(x: Tensor) -> Tensor:
            if x.shape[0] <= search_points:
                return x
            sel = torch.randperm(x.shape[0], generator=generator)[:search_points].to(x.device)
            return x[sel]

        # the search is rigid on src pre-scaled by s0 (1 for rigid ICP)
        s_sub, d_sub = subset(src64) * s0, subset(dst64)
        (f_src, v_src), (f_dst, v_dst) = principal_frame(src64), principal_frame(dst64)
        starts = f_dst @ rotation_grid(1).to(src.device) @ f_src.T
        if yaw_steps > 1 or _axes_ambiguous(v_src, axis_gap) or _axes_ambiguous(v_dst, axis_gap):
            starts = torch.cat([rotation_grid(yaw_steps).to(src.device), starts])
        best, best_t = math.inf, None
        for rot in starts:
            t0 = torch.eye(4, dtype=torch.float64, device=src.device)
            t0[:3, :3] = rot
            t0[:3, 3] = cd - rot @ (s0 * cs)
            res = icp(s_sub, d_sub, init=t0, max_iters=search_iters, with_scale=False, backend=backend)
            if res.mean_dist < best:
                best, best_t = res.mean_dist, res.transform
        assert best_t is not None
        init = best_t.clone()
        init[:3, :3] *= s0  # back to a transform of the unscaled src
    res = icp(src64, dst64, init=init, max_iters=max_iters, with_scale=with_scale, backend=backend)
    t = res.transform
    return apply_transform(src64, t).to(src.dtype), t.to(src.dtype)
