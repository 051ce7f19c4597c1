"""Coordinate hashing, neighbour maps and the per-coordinate-set cache of the sparse ops.

Every sparse op works on :class:`~recon3d.representations.SparseVoxels` whose ``coords (N, 4)``
int32 rows are ``(batch, x, y, z)``. A coordinate set is linearised to one int64 key per voxel,

    key = ((b * P + x + pad) * P + y + pad) * P + z + pad,   P = resolution + 2 * pad,

so a neighbour at offset ``(dx, dy, dz)`` (``|d| <= pad``) has key ``key + (dx * P + dy) * P + dz``
and can never wrap into another row, column or object. Keys are looked up either in a dense
table over the padded grids of all objects (``B * P^3`` entries: the fast path for the 64^3 grids
TRELLIS uses) or, for large grids, by ``searchsorted`` in the sorted keys; both give the same map.

**Cache.** Anything derived from a coordinate set (the neighbour map of each kernel size, a window
partition, the record a downsample leaves for its upsample) is stored in :func:`spatial_cache`,
keyed by the identity of the ``coords`` tensor. ``SparseVoxels.replace(feats=...)`` keeps the same
``coords`` tensor, so consecutive layers on the same voxels (conv -> norm -> conv) build their
neighbour map once. An entry dies with its tensor (a weak reference) and is ignored once the tensor
is modified in place (its version counter moved).
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import torch

from recon3d.errors import ShapeError
from recon3d.representations import SparseVoxels

__all__ = ["spatial_cache", "NeighbourMap", "neighbour_map", "linear_keys", "check_coords"]

#: Largest dense lookup table (entries, int64) before the sort/searchsorted path is used.
DENSE_TABLE_MAX = 1 << 24

_STORE: dict[int, tuple[weakref.ref, int, dict]] = {}


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter (and no in-place edits after)
        return -1


def _drop(key: int, ref: weakref.ref) -> None:
    entry = _STORE.get(key)
    if entry is not None and entry[0] is ref:
        del _STORE[key]


def spatial_cache(coords: torch.Tensor) -> dict:
    """The cache dict attached to this ``coords`` tensor (created empty on first use).

    Values must not hold a reference to ``coords`` itself (the entry would never be freed).
    """
    key = id(coords)
    entry = _STORE.get(key)
    ver = _version(coords)
    if entry is not None and entry[0]() is coords and entry[1] == ver:
        return entry[2]
    store: dict = {}
    _STORE[key] = (weakref.ref(coords, lambda r, key=key: _drop(key, r)), ver, store)
    return store


def check_coords(voxels: SparseVoxels, name: str = "voxels") -> None:
    """Re-check the coordinate range (``SparseVoxels`` checks it at construction; a tensor edited
    in place afterwards would index outside the lookup table)."""
    c = voxels.coords
    if c.dtype != torch.int32:
        raise ShapeError(f"{name}.coords: expected int32 (batch, x, y, z) rows, got dtype {c.dtype}")
    if c.numel():
        xyz = c[:, 1:]
        lo, hi = int(xyz.min()), int(xyz.max())
        if lo < 0 or hi >= voxels.resolution:
            raise ShapeError(f"{name}.coords: expected voxel indices in [0, {voxels.resolution}), got [{lo}, {hi}]")


def linear_keys(coords: torch.Tensor, side: int, pad: int = 0) -> torch.Tensor:
    """``(N,)`` int64 keys of ``coords (N, 4)`` on grids of ``side`` cells shifted by ``pad``."""
    c = coords.long()
    return ((c[:, 0] * side + c[:, 1] + pad) * side + c[:, 2] + pad) * side + c[:, 3] + pad


def kernel_offsets(kernel_size: int) -> torch.Tensor:
    """``(k^3, 3)`` int64 offsets in tap order: tap ``(i, j, l)`` = offset ``+ k // 2``, the last
    axis fastest, i.e. the row-major order of the weight's ``(k, k, k)`` axes."""
    r = range(-(kernel_size // 2), kernel_size // 2 + 1)
    return torch.tensor(list(itertools.product(r, r, r)), dtype=torch.int64)


@dataclass
class NeighbourMap:
    """The submanifold neighbour map of one coordinate set for one kernel size.

    Attributes:
        kernel_size: odd ``k``.
        num_voxels: ``N``.
        out_idx: ``(P,)`` int64 output rows of all (output, input) pairs, grouped by tap, centre
            tap excluded (it is the identity).
        in_idx: ``(P,)`` int64 input rows, aligned with ``out_idx``.
        taps: the tap indices (into ``k^3``, row-major) with at least one pair, in order.
        splits: pairs per tap in ``taps`` (Python ints, ``sum == P``).
        center: the centre tap's index ``(k^3 - 1) // 2``.
    """

    kernel_size: int
    num_voxels: int
    out_idx: torch.Tensor
    in_idx: torch.Tensor
    taps: list[int]
    splits: list[int]
    center: int

    def per_tap(self):
        """``(tap, out_idx, in_idx)`` for every non-centre tap with pairs."""
        outs = torch.split(self.out_idx, self.splits)
        ins = torch.split(self.in_idx, self.splits)
        return zip(self.taps, outs, ins)


def _duplicate_error(voxels: SparseVoxels, keys_sorted: torch.Tensor, side: int, pad: int, name: str) -> ShapeError:
    dup = int(keys_sorted[1:][keys_sorted[1:] == keys_sorted[:-1]][0])
    z = dup % side - pad
    y = dup // side % side - pad
    x = dup // side // side % side - pad
    b = dup // side // side // side
    return ShapeError(f"{name}.coords: duplicate voxel (x, y, z) = ({x}, {y}, {z}) in object {b}; each voxel of an object must appear once")


def neighbour_map(voxels: SparseVoxels, kernel_size: int = 3, method: str = "auto", name: str = "voxels") -> NeighbourMap:
    """The (cached) submanifold neighbour map of ``voxels`` for an odd ``kernel_size``.

    ``method``: ``"auto"`` (dense table when ``B * P^3 <= DENSE_TABLE_MAX``), ``"table"`` or
    ``"sort"`` (the tests check the two agree). Raises :class:`ShapeError` on duplicate voxels in
    one object or coordinates out of range.
    """
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ShapeError(f"kernel_size: expected an odd integer >= 1, got {kernel_size!r}")
    cache = spatial_cache(voxels.coords)
    key = ("neighbours", kernel_size)
    hit = cache.get(key)
    if hit is not None and method == "auto":
        return hit
    check_coords(voxels, name)
    pad = kernel_size // 2
    side = voxels.resolution + 2 * pad
    n = voxels.num_voxels
    device = voxels.coords.device
    keys = linear_keys(voxels.coords, side, pad)
    offs = kernel_offsets(kernel_size).to(device)
    deltas = (offs[:, 0] * side + offs[:, 1]) * side + offs[:, 2]  # (K,)
    center = (kernel_size**3 - 1) // 2
    # Only the taps before the centre are looked up: the tap of offset -d (index K-1-t, the
    # offsets being symmetric in tap order) has the mirrored pairs (i, o) of tap t's (o, i).
    half = deltas[:center]
    table_size = max(voxels.batch_size, 1) * side**3
    if method == "auto":
        method = "table" if table_size <= DENSE_TABLE_MAX else "sort"
    if n == 0:
        nb = torch.empty(center, 0, dtype=torch.int64, device=device)
    elif method == "table":
        table = torch.full((table_size,), -1, dtype=torch.int32 if n < 2**31 else torch.int64, device=device)
        rows = torch.arange(n, device=device, dtype=table.dtype)
        table[keys] = rows
        if not bool((table[keys] == rows).all()):  # a duplicate key: a later row overwrote an earlier one
            raise _duplicate_error(voxels, keys.sort().values, side, pad, name)
        nb = table[keys[None, :] + half[:, None]]  # (center, N) input row or -1
    elif method == "sort":
        sk, perm = keys.sort()
        if n > 1 and bool((sk[1:] == sk[:-1]).any()):
            raise _duplicate_error(voxels, sk, side, pad, name)
        q = keys[None, :] + half[:, None]
        pos = torch.searchsorted(sk, q).clamp_(max=n - 1)
        nb = torch.where(sk[pos] == q, perm[pos], -1)
    else:
        raise ShapeError(f"method: expected 'auto', 'table' or 'sort', got {method!r}")
    flat = (nb >= 0).view(-1).nonzero().squeeze(1)
    out_h = flat % max(n, 1)
    in_h = nb.view(-1)[flat].long()
    counts_h = torch.bincount(flat // max(n, 1), minlength=center).tolist()
    outs_h, ins_h = torch.split(out_h, counts_h), torch.split(in_h, counts_h)
    out_idx = torch.cat([out_h, *ins_h[::-1]])
    in_idx = torch.cat([in_h, *outs_h[::-1]])
    counts = counts_h + counts_h[::-1]
    all_taps = [t for t in range(kernel_size**3) if t != center]
    taps = [t for t, c in zip(all_taps, counts) if c]
    splits = [c for c in counts if c]
    nm = NeighbourMap(kernel_size, n, out_idx, in_idx, taps, splits, center)
    cache[key] = nm
    return nm
