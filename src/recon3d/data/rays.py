"""Ray generation and Plücker ray embeddings from :class:`~recon3d.data.cameras.Cameras`.

Pixel centres are at ``+0.5`` (the convention of GTR, OpenLRM and LGM). Directions are unit
length in world space. Plücker moments come in both sign conventions:

- ``"oxd"``: ``m = o × d`` (the textbook moment; LGM's ``[o×d, d]`` embedding);
- ``"dxo"``: ``m = d × o = -(o × d)`` (what GTR's released weights were trained on).

Orthographic cameras (``Cameras.projection == "orthographic"``) give parallel rays: every
direction is the camera's +z axis, and each origin is the pixel's point on the camera's ``z = 0``
plane, ``c2w @ ((u - cx) / fx, (v - cy) / fy, 0)``. Depth along such a ray is then the camera
z-depth, as for perspective rays scaled by their cosine.
"""

from __future__ import annotations

from typing import Literal

import torch

from recon3d.data.cameras import Cameras
from recon3d.errors import ShapeError

__all__ = ["pixel_grid", "camera_rays", "plucker_embedding"]


def pixel_grid(width: int, height: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(H, W, 2)`` pixel-centre coordinates ``(u + 0.5, v + 0.5)``."""
    v, u = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype) + 0.5,
        torch.arange(width, device=device, dtype=dtype) + 0.5,
        indexing="ij",
    )
    return torch.stack([u, v], -1)


def camera_rays(cameras: Cameras, pixels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """World-space ray origins and unit directions.

    Args:
        cameras: batch ``*B``.
        pixels: optional ``(*B, N, 2)`` continuous pixel coordinates (centre of pixel ``u`` is
            ``u + 0.5``). When omitted, every pixel centre of the image is used.

    Returns:
        ``(origins, directions)``: ``(*B, H, W, 3)`` each when ``pixels`` is None, else ``(*B, N, 3)``.
        Perspective: origins are the camera centres; orthographic: points on the image plane and
        one direction per camera (module docstring).
    """
    B = cameras.batch_shape
    if pixels is None:
        pix = pixel_grid(cameras.width, cameras.height, cameras.device, cameras.c2w.dtype)
        pix = pix.expand(*B, cameras.height, cameras.width, 2)
    else:
        if pixels.shape[:-2] != B or pixels.shape[-1] != 2:
            raise ShapeError(f"pixels: expected shape {list(B)} + [N, 2], got {list(pixels.shape)}")
        pix = pixels
    extra = pix.ndim - len(B) - 1  # number of pixel dims (1 for N, 2 for H W)
    K = cameras.K.reshape(*B, *([1] * extra), 3, 3)
    x = (pix[..., 0] - K[..., 0, 2]) / K[..., 0, 0]
    y = (pix[..., 1] - K[..., 1, 2]) / K[..., 1, 1]
    R = cameras.c2w[..., :3, :3].reshape(*B, *([1] * extra), 3, 3)
    t = cameras.c2w[..., :3, 3].reshape(*B, *([1] * extra), 3)
    if cameras.is_orthographic:
        # Parallel rays: (x, y) are world units on the image plane z = 0 through the centre.
        o = (R @ torch.stack([x, y, torch.zeros_like(x)], -1)[..., None])[..., 0] + t
        d = R[..., :, 2].expand_as(o)
        return o, d
    d_cam = torch.stack([x, y, torch.ones_like(x)], -1)
    d = torch.nn.functional.normalize((R @ d_cam[..., None])[..., 0], dim=-1)
    o = t.expand_as(d)
    return o, d


def plucker_embedding(
    cameras: Cameras, convention: Literal["oxd", "dxo"] = "oxd", order: Literal["dm", "md"] = "md"
) -> torch.Tensor:
    """Per-pixel Plücker coordinates ``(*B, 6, H, W)``, channels-first.

    Args:
        convention: moment sign, ``"oxd"`` (o×d) or ``"dxo"`` (d×o, GTR).
        order: ``"md"`` puts the moment first (LGM: ``[o×d, d]``), ``"dm"`` the direction first
            (GTR: ``[d, d×o]``).
    """
    if convention not in ("oxd", "dxo"):
        raise ShapeError(f"convention: expected 'oxd' or 'dxo', got {convention!r}")
    if order not in ("md", "dm"):
        raise ShapeError(f"order: expected 'md' or 'dm', got {order!r}")
    o, d = camera_rays(cameras)
    m = torch.linalg.cross(o, d) if convention == "oxd" else torch.linalg.cross(d, o)
    emb = torch.cat([m, d] if order == "md" else [d, m], -1)
    return emb.movedim(-1, -3)
