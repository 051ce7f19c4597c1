"""Sparse voxels of several objects in one batch (the TRELLIS / SLAT layout).

``coords (N, 4)`` int32 rows ``(batch, x, y, z)``, every object's rows contiguous and objects in
batch order (the batch column never decreases), voxel indices in ``[0, resolution)``, and
``feats (N, C)`` one feature row per voxel. This is the type the sparse operations work on:
a per-object slice is a contiguous range of rows (``offsets``/``counts``), so splitting and
packing are views and concatenations, never gathers. An object may have no voxels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from recon3d.errors import ShapeError
from recon3d.utils.checks import check_shape

__all__ = ["SparseVoxels"]


@dataclass
class SparseVoxels:
    """A batch of sparse voxel sets on a ``resolution^3`` grid (module docstring).

    Attributes:
        coords: ``(N, 4)`` int32 ``(batch, x, y, z)``, contiguous in memory, rows of one object
            contiguous and in batch order.
        feats: ``(N, C)`` per-voxel features.
        resolution: grid size per axis.
        batch_size: number of objects; defaults to ``max(batch) + 1`` (give it when the last
            objects have no voxels).

    Checked at construction (one error naming the argument): dtype int32 (other integer dtypes
    are converted; floats refused), a contiguous ``(N, 4)`` tensor, the batch column sorted and
    in ``[0, batch_size)``, voxel indices in ``[0, resolution)``, one feature row per voxel.
    """

    coords: torch.Tensor
    feats: torch.Tensor
    resolution: int
    batch_size: int | None = None

    def __post_init__(self) -> None:
        dims = check_shape(self.coords, "N 4", "coords")
        check_shape(self.feats, "N C", "feats", {"N": dims["N"]})
        c = self.coords
        if c.dtype.is_floating_point or c.dtype == torch.bool or c.dtype.is_complex:
            raise ShapeError(f"coords: expected integer (batch, x, y, z) rows (int32), got dtype {c.dtype}")
        # int32 is what sparse-conv kernels (spconv, torchsparse) take; contiguity lets them view rows.
        self.coords = c.to(torch.int32).contiguous()
        if not isinstance(self.resolution, int) or isinstance(self.resolution, bool) or self.resolution < 1:
            raise ShapeError(f"resolution: expected an integer >= 1, got {self.resolution!r}")
        b = self.coords[:, 0]
        if b.numel():
            if bool((b[1:] < b[:-1]).any()):
                raise ShapeError("coords: the rows of one object must be contiguous and in batch order (the batch column must not decrease); sort by batch index")
            lo, hi = int(b.min()), int(b.max())
            if lo < 0:
                raise ShapeError(f"coords: expected batch indices >= 0, got {lo}")
            xyz = self.coords[:, 1:]
            if int(xyz.min()) < 0 or int(xyz.max()) >= self.resolution:
                raise ShapeError(f"coords: expected voxel indices in [0, {self.resolution}), got [{int(xyz.min())}, {int(xyz.max())}]")
        else:
            hi = -1
        if self.batch_size is None:
            self.batch_size = hi + 1
        elif not isinstance(self.batch_size, int) or self.batch_size < hi + 1:
            raise ShapeError(f"batch_size: expected an integer >= {hi + 1} (the largest batch index + 1), got {self.batch_size!r}")
        # Per-object counts once, on the CPU: slicing needs Python ints, and a CUDA batch then syncs
        # here only, not on every slice.
        self._counts = torch.bincount(b.long().cpu(), minlength=self.batch_size) if b.numel() else torch.zeros(self.batch_size, dtype=torch.int64)

    # ------------------------------------------------------------------ layout
    @property
    def counts(self) -> torch.Tensor:
        """``(B,)`` CPU int64 voxels per object."""
        return self._counts

    @property
    def offsets(self) -> torch.Tensor:
        """``(B,)`` CPU int64 first row of each object."""
        return torch.cumsum(self._counts, 0) - self._counts

    @property
    def num_voxels(self) -> int:
        return self.coords.shape[0]

    @property
    def num_channels(self) -> int:
        return self.feats.shape[1]

    def __len__(self) -> int:
        return self.batch_size

    def __getitem__(self, i: int) -> SparseVoxels:
        """Object ``i`` as a batch of one (its batch column set to 0)."""
        if not isinstance(i, int) or not -self.batch_size <= i < self.batch_size:
            raise IndexError(f"SparseVoxels index {i!r}: expected an int in [0, {self.batch_size})")
        i %= self.batch_size
        start, n = int(self.offsets[i]), int(self._counts[i])
        coords = self.coords[start : start + n].clone()
        coords[:, 0] = 0
        return SparseVoxels(coords, self.feats[start : start + n], self.resolution, 1)

    def split(self) -> list[SparseVoxels]:
        """One batch-of-one per object (``from_list`` inverts it)."""
        return [self[i] for i in range(self.batch_size)]

    def xyz(self, i: int) -> torch.Tensor:
        """``(n_i, 3)`` int32 voxel indices of object ``i``."""
        start, n = int(self.offsets[i]), int(self._counts[i])
        return self.coords[start : start + n, 1:]

    @classmethod
    def from_list(cls, items: Sequence[SparseVoxels | tuple[torch.Tensor, torch.Tensor]], resolution: int | None = None) -> SparseVoxels:
        """Pack objects in order: each item a :class:`SparseVoxels` (any batch size) or a pair
        ``(xyz (n_i, 3) integer, feats (n_i, C))`` (then ``resolution`` is required)."""
        items = list(items)
        if not items:
            raise ShapeError("items: expected at least one object to pack")
        coords, feats, base, res = [], [], 0, resolution
        for k, it in enumerate(items):
            if isinstance(it, SparseVoxels):
                if res is not None and it.resolution != res:
                    raise ShapeError(f"items[{k}]: resolution {it.resolution} differs from {res}")
                res = it.resolution
                c = it.coords.clone()
                c[:, 0] += base
                coords.append(c)
                feats.append(it.feats)
                base += it.batch_size
            else:
                if res is None:
                    raise ShapeError("resolution: required when the items are (xyz, feats) pairs")
                xyz, f = it
                check_shape(xyz, "n 3", f"items[{k}] xyz")
                if xyz.dtype.is_floating_point:
                    raise ShapeError(f"items[{k}] xyz: expected integer voxel indices, got dtype {xyz.dtype}")
                coords.append(torch.cat([torch.full_like(xyz[:, :1], base), xyz], 1).to(torch.int32))
                feats.append(f)
                base += 1
        C = {f.shape[-1] for f in feats if f.ndim == 2}
        if len(C) > 1:
            raise ShapeError(f"feats: every object needs the same number of channels, got {sorted(C)}")
        return cls(torch.cat(coords), torch.cat(feats), res, base)

    def replace(self, **changes) -> SparseVoxels:
        """A copy with fields replaced (e.g. ``feats=`` after a layer), validated again."""
        return dataclasses.replace(self, **changes)

    def to(self, *args, **kwargs) -> SparseVoxels:
        """Move/cast the features; ``coords`` moves device only and stays int32."""
        feats = self.feats.to(*args, **kwargs)
        return SparseVoxels(self.coords.to(feats.device), feats, self.resolution, self.batch_size)

    def detach(self) -> SparseVoxels:
        return SparseVoxels(self.coords, self.feats.detach(), self.resolution, self.batch_size)

    def occupied(self, points: torch.Tensor, aabb: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
        """``(Q,)`` bool: which ``points (Q, 3)`` fall in an occupied voxel of this one-object set
        (a ``resolution^3`` grid over the cube ``aabb``; points outside the cube are free)."""
        if self.batch_size != 1:
            raise ShapeError(f"occupied: expected a one-object SparseVoxels (voxels[i]), got batch_size {self.batch_size}")
        res, (lo, hi) = self.resolution, aabb
        idx = ((points - lo) / (hi - lo) * res).floor().long()
        inside = ((idx >= 0) & (idx < res)).all(-1)
        grid = torch.zeros(res, res, res, dtype=torch.bool, device=points.device)
        xyz = self.coords[:, 1:].long().to(points.device)
        grid[xyz[:, 0], xyz[:, 1], xyz[:, 2]] = True
        idx = idx.clamp(0, res - 1)
        return grid[idx[:, 0], idx[:, 1], idx[:, 2]] & inside

    def centers(self, aabb: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
        """``(N, 3)`` world centres of the voxels in the cube ``aabb`` (``lo + (idx + 0.5) * size``)."""
        lo, hi = aabb
        size = (hi - lo) / self.resolution
        return lo + (self.coords[:, 1:].to(self.feats.dtype if self.feats.dtype.is_floating_point else torch.float32) + 0.5) * size
