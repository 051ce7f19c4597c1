"""Triangle-mesh surface sampling (plain torch; below data, render and metrics).

Datasets sample their ground-truth surfaces with it, the evaluation protocol and the methods their
predicted ones, so both sides of a Chamfer distance come from the same sampler.
"""

from __future__ import annotations

import torch
from torch import Tensor

from recon3d.utils.checks import check_shape

__all__ = ["check_mesh", "sample_surface"]


def check_mesh(verts: Tensor, faces: Tensor, name: str) -> None:
    """``verts (V, 3)`` and integer ``faces (F, 3)``, or a ShapeError/ValueError naming ``name``."""
    check_shape(verts, "V 3", f"{name} verts")
    check_shape(faces, "F 3", f"{name} faces")
    if faces.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} faces: expected an integer tensor, got {faces.dtype}")


def sample_surface(verts: Tensor, faces: Tensor, num_points: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Area-weighted uniform samples on a triangle mesh with their face normals.

    Args:
        verts: ``(V, 3)``; faces: ``(F, 3)`` integer indices; ``num_points``: N.
        generator: optional ``torch.Generator`` (on CPU) for reproducible samples.

    Returns:
        ``points (N, 3)`` and unit ``normals (N, 3)`` (right-hand rule on the face winding).
    """
    check_mesh(verts, faces, "mesh")
    tri = verts[faces.long()]  # (F, 3, 3)
    cross = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    area = cross.norm(dim=-1)
    if not bool((area > 0).any()):
        raise ValueError("mesh: all faces have zero area; cannot sample its surface")
    fidx = torch.multinomial(area.double().cpu(), num_points, replacement=True, generator=generator).to(verts.device)
    u = torch.rand(num_points, generator=generator, dtype=torch.float64).to(verts.device)
    v = torch.rand(num_points, generator=generator, dtype=torch.float64).to(verts.device)
    su = u.sqrt()
    w0, w1, w2 = 1 - su, su * (1 - v), su * v
    t = tri[fidx].double()
    pts = w0[:, None] * t[:, 0] + w1[:, None] * t[:, 1] + w2[:, None] * t[:, 2]
    normals = cross[fidx] / area[fidx, None]
    return pts.to(verts.dtype), normals.to(verts.dtype)
