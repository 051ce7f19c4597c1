"""Texture lookup. UVs follow the OBJ / OpenGL convention: ``(0, 0)`` is the image's bottom-left
corner, ``v`` points up (trimesh uses the same and converts for glTF on export)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recon3d.utils.checks import check_shape

__all__ = ["sample_texture"]


def sample_texture(texture: torch.Tensor, uv: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Bilinear texture lookup.

    Args:
        texture: ``(B, C, Ht, Wt)`` image, row 0 at the top.
        uv: ``(B, V, 2, H, W)`` per-pixel UVs in [0, 1] (e.g. ``fragments.interpolate(uvs)``).

    Returns:
        ``(B, V, C, H, W)``.
    """
    dims = check_shape(texture, "B C Ht Wt", "texture")
    check_shape(uv, "B V 2 H W", "uv", {"B": dims["B"]})
    B, V, _, H, W = uv.shape
    grid = torch.stack([uv[:, :, 0] * 2 - 1, (1 - uv[:, :, 1]) * 2 - 1], -1).reshape(B, V * H, W, 2)
    out = F.grid_sample(texture, grid.to(texture.dtype), mode=mode, padding_mode="border", align_corners=False)
    return out.reshape(B, dims["C"], V, H, W).transpose(1, 2)
