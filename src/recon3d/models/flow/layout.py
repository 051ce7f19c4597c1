"""How a flow state's elements belong to objects: dense batches, packed rows, :class:`SparseVoxels`.

The flow objective and sampler do element-wise arithmetic with per-object scalars (the time
``t``, a dropout flag, a guidance-rescale ratio). A :class:`FlowLayout` hides where an object's
elements live:

* a **dense** tensor ``(B, ...)``: row ``b`` is object ``b``;
* a **packed** tensor ``(N, C)`` with a per-row object index ``(N,)`` (the TRELLIS sparse
  layout: several objects' voxels stacked along the first axis);
* a :class:`~recon3d.representations.SparseVoxels`: packed ``feats`` with the index taken from
  ``coords[:, 0]``; results are wrapped back into a ``SparseVoxels`` on the same coords.

Everything else in :mod:`recon3d.models.flow` needs only :meth:`FlowLayout.expand` -- a callable
mapping a per-object ``(B,)`` tensor to one broadcastable against the flat features -- plus the
per-object statistics of :meth:`FlowLayout.std`. Any other packing plugs in by passing
``batch_index``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from recon3d.errors import ShapeError
from recon3d.representations.voxels import SparseVoxels

__all__ = ["FlowLayout", "layout_of", "randn_per_object"]

Generators = torch.Generator | Sequence[torch.Generator] | None


class FlowLayout:
    """Object membership of a flow state's elements (module docstring).

    Args:
        batch_size: number of objects ``B``.
        index: ``(N,)`` int64 object index of every row for a packed state, ``None`` for dense
            (row ``b`` of a ``(B, ...)`` tensor is object ``b``).
        ndim: number of dimensions of the flat tensor (``expand`` reshapes to it).
        template: the ``SparseVoxels`` whose coords results are wrapped onto, else ``None``.
    """

    def __init__(self, batch_size: int, index: torch.Tensor | None, ndim: int, template: SparseVoxels | None = None):
        self.batch_size = batch_size
        self.index = index
        self.ndim = ndim
        self.template = template
        self._rows: torch.Tensor | None = None  # (B,) rows per object of a packed state, cached
        self._slices: list[tuple[int, int]] | None = None
        if index is not None and (index.numel() < 2 or bool((index[1:] >= index[:-1]).all())):
            # Sorted (SparseVoxels guarantees it): objects are contiguous row ranges, and the
            # per-object statistics are plain reductions over views instead of scatters.
            ends = torch.bincount(index, minlength=batch_size).cumsum(0).tolist()
            self._slices = list(zip([0] + ends[:-1], ends))

    # -------------------------------------------------------------- per-object -> per-element
    def expand(self, per_object: torch.Tensor | float) -> torch.Tensor | float:
        """``(B,)`` per-object values broadcastable against the flat state: ``(B, 1, ..., 1)``
        for dense, ``(N, 1, ...)`` gathered through the row index for packed. A Python float
        (one value for every object, as in the sampler) passes through unchanged."""
        if not torch.is_tensor(per_object):
            return per_object
        if per_object.ndim != 1 or per_object.shape[0] != self.batch_size:
            raise ShapeError(f"per-object value: expected shape ({self.batch_size},), got {tuple(per_object.shape)}")
        if self.index is None:
            return per_object.view(-1, *([1] * (self.ndim - 1)))
        return per_object.to(self.index.device)[self.index].view(-1, *([1] * (self.ndim - 1)))

    def counts(self, flat: torch.Tensor) -> torch.Tensor:
        """``(B,)`` number of scalar elements per object (float64, on ``flat``'s device)."""
        per_row = flat[0].numel() if flat.shape[0] else int(torch.tensor(flat.shape[1:]).prod())
        if self.index is None:
            return torch.full((self.batch_size,), float(per_row), dtype=torch.float64, device=flat.device)
        if self._rows is None or self._rows.device != flat.device:
            self._rows = torch.bincount(self.index, minlength=self.batch_size).to(device=flat.device, dtype=torch.float64)
        return self._rows * per_row

    def mean(self, flat: torch.Tensor) -> torch.Tensor:
        """``(B,)`` per-object mean over all of an object's elements (float64; NaN for an empty object)."""
        if self.index is None:
            return flat.reshape(flat.shape[0], -1).to(torch.float64).mean(1)
        sums = torch.zeros(self.batch_size, dtype=torch.float64, device=flat.device)
        sums.index_add_(0, self.index, flat.reshape(flat.shape[0], -1).to(torch.float64).sum(1))
        return sums / self.counts(flat)

    def std(self, flat: torch.Tensor) -> torch.Tensor:
        """``(B,)`` per-object standard deviation over all of an object's elements, with Bessel's
        correction like ``torch.std`` (NaN for an object of fewer than 2 elements), in ``flat``'s dtype."""
        if self.index is None:
            return flat.reshape(flat.shape[0], -1).std(1)
        if self._slices is not None:
            nan = flat.new_full((), float("nan"))
            return torch.stack([flat[a:b].std() if (b - a) * max(flat[0:1].numel(), 1) > 1 else nan for a, b in self._slices]) \
                if self._slices else flat.new_zeros(0)
        x = flat.reshape(flat.shape[0], -1).to(torch.float64)
        centred = x - self.mean(flat)[self.index].unsqueeze(1)
        ss = torch.zeros(self.batch_size, dtype=torch.float64, device=flat.device)
        ss.index_add_(0, self.index, centred.square().sum(1))
        return (ss / (self.counts(flat) - 1)).sqrt().to(flat.dtype)

    # -------------------------------------------------------------- user type <-> flat tensor
    def unwrap(self, x: torch.Tensor | SparseVoxels, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
        """The flat tensor of ``x``, checked against this layout and, with ``like``, against that
        tensor's exact shape (``name`` in the error)."""
        if isinstance(x, SparseVoxels):
            if self.template is None:
                raise ShapeError(f"{name}: got SparseVoxels where the state is a plain tensor")
            if x.coords is not self.template.coords and not torch.equal(x.coords, self.template.coords):
                raise ShapeError(f"{name}: SparseVoxels on other coords than the state's")
            x = x.feats
        if not torch.is_tensor(x):
            raise ShapeError(f"{name}: expected a tensor or SparseVoxels, got {type(x).__name__}")
        if self.index is None and (x.ndim != self.ndim or x.shape[0] != self.batch_size):
            raise ShapeError(f"{name}: expected a ({self.batch_size}, ...) tensor of {self.ndim} dims, got {tuple(x.shape)}")
        if self.index is not None and x.shape[0] != self.index.shape[0]:
            raise ShapeError(f"{name}: expected {self.index.shape[0]} packed rows, got {tuple(x.shape)}")
        if like is not None and x.shape != like.shape:
            raise ShapeError(f"{name}: expected shape {tuple(like.shape)}, got {tuple(x.shape)}")
        return x

    def wrap(self, flat: torch.Tensor) -> torch.Tensor | SparseVoxels:
        """``flat`` as the user's type: a ``SparseVoxels`` on the template's coords, else the tensor."""
        if self.template is None:
            return flat
        return SparseVoxels(self.template.coords, flat, self.template.resolution, self.template.batch_size)


def layout_of(x: torch.Tensor | SparseVoxels, batch_index: torch.Tensor | None = None,
              batch_size: int | None = None, name: str = "x") -> FlowLayout:
    """The :class:`FlowLayout` of a state.

    Args:
        x: a dense ``(B, ...)`` tensor, a packed ``(N, C...)`` tensor (with ``batch_index``), or a
            :class:`SparseVoxels` (its ``coords[:, 0]`` is the index; ``batch_index`` must be None).
        batch_index: ``(N,)`` integer object index per row of a packed tensor, non-negative.
        batch_size: number of objects of a packed tensor (default ``max(batch_index) + 1``; give it
            when trailing objects are empty).
    """
    if isinstance(x, SparseVoxels):
        if batch_index is not None:
            raise ShapeError(f"batch_index: not used with a SparseVoxels {name} (its coords[:, 0] is the index)")
        return FlowLayout(x.batch_size, x.coords[:, 0].long(), x.feats.ndim, template=x)
    if not torch.is_tensor(x):
        raise ShapeError(f"{name}: expected a tensor or SparseVoxels, got {type(x).__name__}")
    if x.ndim < 1:
        raise ShapeError(f"{name}: expected a batched tensor (B, ...) or packed rows (N, ...), got a scalar")
    if batch_index is None:
        return FlowLayout(x.shape[0], None, x.ndim)
    if batch_index.ndim != 1 or batch_index.shape[0] != x.shape[0] or batch_index.dtype.is_floating_point:
        raise ShapeError(f"batch_index: expected ({x.shape[0]},) integer object indices, got {tuple(batch_index.shape)} {batch_index.dtype}")
    index = batch_index.long().to(x.device)
    hi = int(index.max()) + 1 if index.numel() else 0
    if index.numel() and int(index.min()) < 0:
        raise ShapeError(f"batch_index: expected indices >= 0, got {int(index.min())}")
    if batch_size is None:
        batch_size = hi
    elif batch_size < hi:
        raise ShapeError(f"batch_size: expected >= {hi} (max batch_index + 1), got {batch_size}")
    return FlowLayout(batch_size, index, x.ndim)


def _generator_list(generator: Generators, batch_size: int, name: str = "generator") -> list[torch.Generator] | None:
    if generator is None or isinstance(generator, torch.Generator):
        return None
    gens = list(generator)
    if len(gens) != batch_size or not all(isinstance(g, torch.Generator) for g in gens):
        raise ShapeError(f"{name}: expected one torch.Generator or a sequence of {batch_size} (one per object), got {len(gens)} items")
    return gens


def randn_per_object(layout: FlowLayout, like: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Standard normal noise shaped like the flat state ``like``.

    With a sequence of ``B`` generators, object ``b``'s elements are drawn from generator ``b``
    alone (on the generator's device, then moved), so an object's noise does not depend on which
    other objects share its batch. One generator (or None) draws the whole tensor at once.
    """
    gens = _generator_list(generator, layout.batch_size)
    if gens is None:
        dev = generator.device if isinstance(generator, torch.Generator) else like.device
        return torch.randn(like.shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)
    if layout.index is None:
        parts = [torch.randn(like.shape[1:], generator=g, device=g.device, dtype=like.dtype).to(like.device) for g in gens]
        return torch.stack(parts) if parts else like.new_empty(like.shape)
    counts = torch.bincount(layout.index, minlength=layout.batch_size).tolist()
    # Packed rows of one object are contiguous in every layout recon3d builds (SparseVoxels checks
    # it); a shuffled index would still work but then the rows are scattered back by index.
    parts = [torch.randn((n, *like.shape[1:]), generator=g, device=g.device, dtype=like.dtype).to(like.device) for g, n in zip(gens, counts)]
    noise = torch.cat(parts) if parts else like.new_empty(like.shape)
    order = torch.argsort(layout.index, stable=True)
    out = torch.empty_like(noise)
    out[order] = noise
    return out
