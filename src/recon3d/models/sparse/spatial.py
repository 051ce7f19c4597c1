"""The resolution changes TRELLIS uses on sparse voxels (it has no strided sparse conv).

- :class:`SparseDownsample`: mean-pool over ``coords // factor`` per object; the output's voxels
  are sorted by ``(batch, x, y, z)`` and the resolution becomes ``ceil(resolution / factor)``.
  It records (fine coords, the inverse index) in the cache of the *output's* coordinate set.
- :class:`SparseUpsample`: copies each coarse feature back to its fine voxels through that record
  (nearest neighbour), so a U-Net's up path lands exactly on the voxels of its down path; layers in
  between that keep the coordinates (conv, norm, attention: ``replace(feats=...)``) keep the record.
  Without a record it raises one clear error.
- :class:`SparseSubdivide`: every voxel becomes its 8 children ``2c + {0,1}^3`` (resolution x2),
  each child a copy of the parent's features; the children of one parent are consecutive rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from recon3d.errors import ShapeError
from recon3d.models.sparse.hashing import check_coords, linear_keys, spatial_cache
from recon3d.representations import SparseVoxels

__all__ = ["SparseDownsample", "SparseUpsample", "SparseSubdivide", "downsample", "upsample", "subdivide"]


@dataclass
class _DownRecord:
    fine_coords: torch.Tensor
    inverse: torch.Tensor  # (N_fine,) coarse row of each fine voxel
    resolution: int
    batch_size: int


def _check_factor(factor) -> int:
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 2:
        raise ShapeError(f"factor: expected an integer >= 2, got {factor!r}")
    return factor


def downsample(voxels: SparseVoxels, factor: int = 2) -> SparseVoxels:
    """Mean-pool ``voxels`` (``feats (N, C)``) onto ``coords // factor``: ``(M, C)`` at the ``M``
    occupied coarse cells, sorted by ``(batch, x, y, z)``; records the way back for :func:`upsample`."""
    factor = _check_factor(factor)
    if not isinstance(voxels, SparseVoxels):
        raise ShapeError(f"voxels: expected a SparseVoxels, got {type(voxels).__name__}")
    check_coords(voxels)
    res = -(-voxels.resolution // factor)
    coarse = voxels.coords.clone()
    coarse[:, 1:] = torch.div(coarse[:, 1:], factor, rounding_mode="floor")
    keys = linear_keys(coarse, res)
    uniq, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    m, c = uniq.numel(), voxels.num_channels
    sums = voxels.feats.new_zeros(m, c).index_add_(0, inverse, voxels.feats)
    counts = torch.bincount(inverse, minlength=m).to(sums.dtype)
    feats = sums / counts.clamp_min(1)[:, None]
    xyz = torch.stack([uniq // res**3, uniq // res**2 % res, uniq // res % res, uniq % res], 1).to(torch.int32)
    out = SparseVoxels(xyz.contiguous(), feats, res, voxels.batch_size)
    spatial_cache(out.coords)[("downsample", factor)] = _DownRecord(voxels.coords, inverse, voxels.resolution, voxels.batch_size)
    return out


def upsample(voxels: SparseVoxels, factor: int = 2) -> SparseVoxels:
    """The fine voxels of the :func:`downsample` that produced ``voxels``' coordinates, each with
    its coarse cell's features ``(N_fine, C)``."""
    factor = _check_factor(factor)
    if not isinstance(voxels, SparseVoxels):
        raise ShapeError(f"voxels: expected a SparseVoxels, got {type(voxels).__name__}")
    rec = spatial_cache(voxels.coords).get(("downsample", factor))
    if rec is None:
        raise ShapeError(f"voxels: SparseUpsample({factor}) needs the voxels made by its paired SparseDownsample({factor}) (or layers that keep their coords); these coords have no downsample record")
    return SparseVoxels(rec.fine_coords, voxels.feats.index_select(0, rec.inverse), rec.resolution, rec.batch_size)


#: ``(8, 3)`` child offsets ``{0,1}^3``, z fastest.
_CHILDREN = torch.tensor([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=torch.int32)


def subdivide(voxels: SparseVoxels) -> SparseVoxels:
    """Each voxel -> its 8 children ``2c + {0,1}^3`` on the ``2 * resolution`` grid, features copied:
    ``(8N, C)``, the children of row ``i`` at rows ``8i .. 8i + 7``."""
    if not isinstance(voxels, SparseVoxels):
        raise ShapeError(f"voxels: expected a SparseVoxels, got {type(voxels).__name__}")
    n = voxels.num_voxels
    c = voxels.coords
    child = c[:, None, :].repeat(1, 8, 1)
    child[:, :, 1:] = child[:, :, 1:] * 2 + _CHILDREN.to(c.device)[None]
    feats = voxels.feats[:, None].expand(n, 8, *voxels.feats.shape[1:]).reshape(n * 8, *voxels.feats.shape[1:])
    return SparseVoxels(child.reshape(n * 8, 4).contiguous(), feats, voxels.resolution * 2, voxels.batch_size)


class SparseDownsample(nn.Module):
    """:func:`downsample` as a module (TRELLIS's ``SparseDownsample(factor)``)."""

    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = _check_factor(factor)

    def forward(self, voxels: SparseVoxels) -> SparseVoxels:
        return downsample(voxels, self.factor)


class SparseUpsample(nn.Module):
    """:func:`upsample` as a module (TRELLIS's ``SparseUpsample(factor)``)."""

    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = _check_factor(factor)

    def forward(self, voxels: SparseVoxels) -> SparseVoxels:
        return upsample(voxels, self.factor)


class SparseSubdivide(nn.Module):
    """:func:`subdivide` as a module (TRELLIS's ``SparseSubdivide``)."""

    def forward(self, voxels: SparseVoxels) -> SparseVoxels:
        return subdivide(voxels)
