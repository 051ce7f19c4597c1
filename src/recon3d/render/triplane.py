"""Triplane feature sampling (EG3D / LRM / GTR).

A triplane is ``(B, 3, C, R, R)``: three axis-aligned feature planes in the order **xy, xz, yz**
(the order of GTR's and OpenLRM's code). A world point ``p`` in the box ``aabb`` is normalised to
``[-1, 1]^3`` and looked up bilinearly in each plane with ``grid_sample(align_corners=False)``;
plane ``xy`` is indexed by ``(x, y)`` as ``grid_sample``'s ``(u, v)``, i.e. ``x`` runs along the
plane's width and ``y`` along its height.

The three per-plane features are concatenated in one of two channel layouts:

- ``"plane_major"``: ``[f_xy(0..C-1), f_xz(0..C-1), f_yz(0..C-1)]`` (OpenLRM, InstantMesh);
- ``"interleaved"``: channel ``c * 3 + p`` holds channel ``c`` of plane ``p`` (GTR's released
  field MLPs expect this order).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from recon3d.errors import ShapeError
from recon3d.utils.checks import check_shape

__all__ = ["sample_triplane", "PLANE_AXES"]

#: Which two world axes index each plane, in plane order (xy, xz, yz).
PLANE_AXES = ((0, 1), (0, 2), (1, 2))


def sample_triplane(
    planes: torch.Tensor,
    points: torch.Tensor,
    aabb: tuple[float, float] = (-1.0, 1.0),
    layout: Literal["plane_major", "interleaved"] = "plane_major",
    padding_mode: Literal["zeros", "border", "reflection"] = "border",
    mode: Literal["bilinear", "nearest"] = "bilinear",
) -> torch.Tensor:
    """Sample triplane features at world points.

    Args:
        planes: ``(B, 3, C, R, R)`` feature planes (xy, xz, yz).
        points: ``(B, N, 3)`` world points.
        aabb: ``(lo, hi)`` of the cubic box the planes span.
        layout: channel layout of the result (module docstring).
        padding_mode: ``grid_sample`` padding for points outside the box (GTR: ``"border"``,
            OpenLRM: ``"zeros"``).

    Returns:
        ``(B, N, 3C)`` features.
    """
    dims = check_shape(planes, "B 3 C H W", "planes")
    check_shape(points, "B N 3", "points", {"B": dims["B"]})
    if layout not in ("plane_major", "interleaved"):
        raise ShapeError(f"layout: expected 'plane_major' or 'interleaved', got {layout!r}")
    B, _, C, H, W = planes.shape
    lo, hi = aabb
    p = (points - lo) / (hi - lo) * 2 - 1
    # One grid_sample over the 3 planes stacked into the batch: (B*3, C, H, W) with (B*3, 1, N, 2).
    coords = torch.stack([p[..., list(ax)] for ax in PLANE_AXES], 1)  # B, 3, N, 2
    feats = F.grid_sample(
        planes.reshape(B * 3, C, H, W),
        coords.reshape(B * 3, 1, -1, 2).to(planes.dtype),
        mode=mode,
        padding_mode=padding_mode,
        align_corners=False,
    )  # B*3, C, 1, N
    feats = feats.reshape(B, 3, C, -1)
    if layout == "plane_major":
        return feats.permute(0, 3, 1, 2).reshape(B, -1, 3 * C)
    return feats.permute(0, 3, 2, 1).reshape(B, -1, 3 * C)
