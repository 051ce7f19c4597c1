"""Surface voxelisation: the voxels of a ``R^3`` grid over a cube that a surface passes through.

TRELLIS's sparse structures are the **surface** voxels of a mesh (Open3D
``VoxelGrid.create_from_triangle_mesh_within_bounds``, voxel 1/64 of the object's cube;
``dataset_toolkits/voxelize.py``), not its solid occupancy. Open3D tests every triangle against
every voxel box it may touch; here each triangle is sampled on a barycentric lattice whose
spacing is at most ``spacing`` voxel edges (default 0.25), and the voxels holding a sample are
marked. A voxel that a triangle only clips within ``spacing`` of a box edge can be missed;
with the default that is a thin sliver, and the triangle's neighbouring voxels are always found.

Grid convention: voxel ``(i, j, k)`` covers ``aabb_lo + ([i, i+1], [j, j+1], [k, k+1]) * h`` with
``h = (hi - lo) / R`` (axis 0 = x), the convention of
:meth:`recon3d.representations.SparseVoxels.centers`.
"""

from __future__ import annotations

import torch

from recon3d.errors import ShapeError

__all__ = ["surface_voxels", "points_to_voxels"]


def points_to_voxels(points: torch.Tensor, resolution: int, aabb: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Occupancy ``(R, R, R)`` bool of the voxels holding at least one of ``points (P, 3)``
    (points outside the cube are ignored, as Open3D's ``within_bounds`` clips)."""
    if points.ndim != 2 or points.shape[1] != 3:
        raise ShapeError(f"points: expected (P, 3), got {tuple(points.shape)}")
    lo, hi = float(aabb[0]), float(aabb[1])
    R = int(resolution)
    idx = torch.floor((points.double() - lo) / (hi - lo) * R).long()
    inside = ((idx >= 0) & (idx < R)).all(1)
    idx = idx[inside]
    occ = torch.zeros(R, R, R, dtype=torch.bool, device=points.device)
    occ[idx[:, 0], idx[:, 1], idx[:, 2]] = True
    return occ


def _lattice(k: int, dtype, device) -> torch.Tensor:
    """Barycentric weights ``(M, 3)`` of the points ``(a/k, b/k, 1 - a/k - b/k)``, ``a + b <= k``."""
    a, b = torch.meshgrid(torch.arange(k + 1), torch.arange(k + 1), indexing="ij")
    keep = (a + b) <= k
    a, b = a[keep].to(dtype), b[keep].to(dtype)
    return torch.stack([a / k, b / k, 1 - (a + b) / k], 1).to(device)


def surface_voxels(verts: torch.Tensor, faces: torch.Tensor, resolution: int, aabb: tuple[float, float] = (-1.0, 1.0),
                   spacing: float = 0.25, max_points: int = 20_000_000) -> torch.Tensor:
    """Occupancy ``(R, R, R)`` bool of the voxels a triangle mesh passes through (module docstring).

    Args:
        verts: ``(V, 3)`` vertex positions in the cube's frame.
        faces: ``(F, 3)`` vertex indices.
        resolution: ``R``.
        aabb: the cube ``[lo, hi]^3`` the grid covers (recon3d: ``[-1, 1]``; TRELLIS: ``[-0.5, 0.5]``).
        spacing: largest lattice step along an edge, in voxel edges.
        max_points: refuse meshes that would need more samples (one clear error, not an OOM).
    """
    if verts.ndim != 2 or verts.shape[1] != 3:
        raise ShapeError(f"verts: expected (V, 3), got {tuple(verts.shape)}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ShapeError(f"faces: expected (F, 3), got {tuple(faces.shape)}")
    R = int(resolution)
    occ = torch.zeros(R, R, R, dtype=torch.bool, device=verts.device)
    if faces.shape[0] == 0:
        return occ
    h = (float(aabb[1]) - float(aabb[0])) / R
    v = verts.double()
    tri = v[faces.long()]  # (F, 3, 3)
    edges = torch.stack([(tri[:, 1] - tri[:, 0]).norm(dim=1), (tri[:, 2] - tri[:, 1]).norm(dim=1),
                         (tri[:, 0] - tri[:, 2]).norm(dim=1)], 1).amax(1)
    ks = torch.clamp(torch.ceil(edges / (spacing * h)), min=1).long()
    total = int(((ks + 1) * (ks + 2) // 2).sum())
    if total > max_points:
        raise ShapeError(f"surface_voxels: the mesh needs {total} surface samples at resolution {R} (limit {max_points}); "
                         "decimate it or lower the resolution")
    for k in torch.unique(ks).tolist():
        sel = tri[ks == k]
        w = _lattice(int(k), v.dtype, v.device)  # (M, 3)
        pts = torch.einsum("mi,fid->fmd", w, sel).reshape(-1, 3)
        occ |= points_to_voxels(pts, R, aabb)
    return occ

