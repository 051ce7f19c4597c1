"""Random sparse voxel batches and their dense grids (shared by the sparse-op tests)."""

from __future__ import annotations

import torch

from recon3d.representations import SparseVoxels


def random_voxels(counts_p=(0.1, 0.25), resolution=12, channels=8, seed=0, dtype=torch.float64, empty=()):
    """Objects with occupancy ``p`` each (``empty``: indices of objects given no voxels)."""
    g = torch.Generator().manual_seed(seed)
    rows, feats = [], []
    for b, p in enumerate(counts_p):
        occ = torch.rand(resolution, resolution, resolution, generator=g) < p
        if b in empty:
            occ[:] = False
        xyz = occ.nonzero()
        rows.append(torch.cat([torch.full((xyz.shape[0], 1), b), xyz], 1))
        feats.append(torch.randn(xyz.shape[0], channels, generator=g, dtype=dtype))
    return SparseVoxels(torch.cat(rows).int(), torch.cat(feats), resolution, len(counts_p))


def to_dense(v: SparseVoxels, feats: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, C, R, R, R)`` grid with ``feats`` (default ``v.feats``) at the voxels, zero elsewhere."""
    f = v.feats if feats is None else feats
    r = v.resolution
    c = v.coords.long()
    grid = torch.zeros(v.batch_size, r, r, r, f.shape[1], dtype=f.dtype)
    grid = grid.index_put((c[:, 0], c[:, 1], c[:, 2], c[:, 3]), f)
    return grid.permute(0, 4, 1, 2, 3)


def at_voxels(grid: torch.Tensor, v: SparseVoxels) -> torch.Tensor:
    """``(N, C)`` values of a ``(B, C, R, R, R)`` grid at the voxels of ``v``."""
    c = v.coords.long()
    return grid.permute(0, 2, 3, 4, 1)[c[:, 0], c[:, 1], c[:, 2], c[:, 3]]
