"""The standard 3DGS parameterisation: batches of Gaussian sets, dense or ragged (packed).

Attributes are stored *activated*: unit-free scales (not log), opacities in [0, 1], quaternions
``(w, x, y, z)`` (normalised on use). Colours are either RGB ``(B, N, 3)`` in [0, 1] or real
spherical-harmonics coefficients ``(B, N, (d+1)^2, 3)`` whose DC term encodes ``rgb - 0.5``
(``rgb = 0.5 + C0 * f_dc``), as in the 3DGS code and gsplat.

Two layouts of the same class (:class:`Gaussians`):

- **dense**: ``B`` sets of the same ``N >= 1`` Gaussians, every attribute ``(B, N, ...)`` (what
  the rasterizers take);
- **packed** (ragged): the Gaussians of all ``B`` objects concatenated, every attribute
  ``(T, ...)`` with ``T = sum(counts)``, and ``counts (B,)`` saying how many belong to each object
  in order (an object may have none: TRELLIS-style decoders give each object its own number).
  ``offsets[i] = counts[:i].sum()`` is where object ``i`` starts. ``counts`` lives on the CPU, so
  splitting a CUDA batch never waits for the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from recon3d.errors import ShapeError
from recon3d.utils.checks import check_finite, check_shape

__all__ = ["Gaussians", "quat_to_rotmat", "eval_sh", "SH_C0", "rgb_to_sh_dc", "sh_dc_to_rgb"]

_FIELDS = ("means", "quats", "scales", "opacities", "colors")

SH_C0 = 0.28209479177387814  # 1 / (2 sqrt(pi))


def rgb_to_sh_dc(rgb: torch.Tensor) -> torch.Tensor:
    """DC SH coefficient giving colour ``rgb`` (any shape)."""
    return (rgb - 0.5) / SH_C0


def sh_dc_to_rgb(dc: torch.Tensor) -> torch.Tensor:
    """Colour of a DC-only SH coefficient (any shape)."""
    return dc * SH_C0 + 0.5


def quat_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(..., 3, 3)`` from quaternions ``(..., 4)`` ``(w, x, y, z)`` (normalised here)."""
    w, x, y, z = torch.nn.functional.normalize(q, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        -1,
    ).reshape(*q.shape[:-1], 3, 3)


def eval_sh(coeffs: torch.Tensor, dirs: torch.Tensor, degree: int) -> torch.Tensor:
    """Colour from real SH ``coeffs (..., K, 3)`` seen along unit ``dirs (..., 3)``, degree ≤ 3.

    Returns ``(..., 3)``: ``0.5 + sum_k Y_k(dir) c_k``, clamped at 0 (the 3DGS convention).
    """
    if not 0 <= degree <= 3:
        raise ShapeError(f"sh degree: expected 0..3, got {degree}")
    if coeffs.shape[-2] < (degree + 1) ** 2:
        raise ShapeError(f"coeffs: expected at least {(degree + 1) ** 2} SH coefficients for degree {degree}, got {coeffs.shape[-2]}")
    x, y, z = dirs.unbind(-1)
    basis = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        c1 = math.sqrt(3 / (4 * math.pi))
        basis += [-c1 * y, c1 * z, -c1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        c2a, c2b, c2c = math.sqrt(15 / (4 * math.pi)), math.sqrt(5 / (16 * math.pi)), math.sqrt(15 / (16 * math.pi))
        basis += [c2a * xy, -c2a * yz, c2b * (2 * zz - xx - yy), -c2a * xz, c2c * (xx - yy)]
    if degree >= 3:
        a = math.sqrt(35 / (32 * math.pi))
        b = math.sqrt(105 / (4 * math.pi))
        c = math.sqrt(21 / (32 * math.pi))
        d = math.sqrt(7 / (16 * math.pi))
        e = math.sqrt(105 / (16 * math.pi))
        basis += [
            -a * y * (3 * xx - yy),
            b * xy * z,
            -c * y * (4 * zz - xx - yy),
            d * z * (2 * zz - 3 * xx - 3 * yy),
            -c * x * (4 * zz - xx - yy),
            e * z * (xx - yy),
            -a * x * (xx - 3 * yy),
        ]
    Y = torch.stack(basis, -1)  # ..., K
    return ((Y[..., None] * coeffs[..., : Y.shape[-1], :]).sum(-2) + 0.5).clamp_min(0.0)


def _as_counts(counts, name: str = "counts") -> torch.Tensor:
    """``counts`` as a CPU int64 vector, refusing anything else with one line naming ``name``."""
    c = torch.as_tensor(counts).detach().to("cpu")
    if c.ndim != 1 or c.dtype.is_floating_point or c.dtype == torch.bool:
        raise ShapeError(f"{name}: expected a 1-D integer vector of per-object counts, got dtype {c.dtype} shape {list(c.shape)}")
    c = c.to(torch.int64)
    if (c < 0).any():
        raise ShapeError(f"{name}: expected counts >= 0, got {c.tolist()}")
    return c


@dataclass
class Gaussians:
    """A batch of 3D Gaussian sets, dense ``(B, N, ...)`` or packed ``(T, ...)`` + ``counts`` (module docstring).

    Attributes:
        means: ``(B, N, 3)`` / ``(T, 3)`` world positions.
        quats: ``(B, N, 4)`` / ``(T, 4)`` rotations ``(w, x, y, z)``.
        scales: ``(B, N, 3)`` / ``(T, 3)`` standard deviations along the local axes (activated).
        opacities: ``(B, N)`` / ``(T,)`` in [0, 1] (activated).
        colors: RGB ``(B, N, 3)`` / ``(T, 3)`` in [0, 1], or SH coefficients ``(B, N, K, 3)`` /
            ``(T, K, 3)`` with ``sh_degree``.
        sh_degree: ``None`` for RGB colours, else the SH degree of ``colors``.
        counts: ``None`` for the dense layout; for the packed one ``(B,)`` Gaussians per object
            (a list of ints is accepted). After construction it is always the ``(B,)`` CPU int64
            vector of per-object counts (``N`` each for a dense batch).

    A dense batch must have ``N >= 1`` (an empty dense batch is almost always a decoder bug); an
    object without Gaussians is a count of 0 in a packed batch.
    """

    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    colors: torch.Tensor
    sh_degree: int | None = None
    counts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.means, torch.Tensor):
            raise ShapeError(f"means: expected a torch.Tensor, got {type(self.means).__name__}")
        packed = self.means.ndim == 2
        if packed and self.counts is None:
            raise ShapeError(f"counts: a packed batch (means {list(self.means.shape)}) needs the per-object counts")
        lead = "T" if packed else "B N"
        dims = check_shape(self.means, f"{lead} 3", "means")
        check_shape(self.quats, f"{lead} 4", "quats", dims)
        check_shape(self.scales, f"{lead} 3", "scales", dims)
        check_shape(self.opacities, lead, "opacities", dims)
        if self.sh_degree is None:
            check_shape(self.colors, f"{lead} 3", "colors", dims)
        else:
            if not 0 <= self.sh_degree <= 3:
                raise ShapeError(f"sh_degree: expected 0..3 or None, got {self.sh_degree}")
            check_shape(self.colors, f"{lead} K 3", "colors (SH coefficients)", dims)
            if dims["K"] < (self.sh_degree + 1) ** 2:
                raise ShapeError(f"colors: expected >= {(self.sh_degree + 1) ** 2} SH coefficients for degree {self.sh_degree}, got {dims['K']}")
        if packed:
            self.counts = _as_counts(self.counts)
            if int(self.counts.sum()) != dims["T"]:
                raise ShapeError(f"counts: expected per-object counts summing to the {dims['T']} packed Gaussians, got {self.counts.tolist()} (sum {int(self.counts.sum())})")
        else:
            if dims["N"] == 0:
                raise ShapeError("means: expected a non-empty Gaussian set, got N=0 (objects without Gaussians go in a packed batch: Gaussians.from_list)")
            full = torch.full((dims["B"],), dims["N"], dtype=torch.int64)
            # A dense batch's counts are implied; given ones (e.g. through dataclasses.replace) must agree.
            if self.counts is not None and not torch.equal(_as_counts(self.counts), full):
                raise ShapeError(f"counts: a dense batch of {dims['B']} sets of {dims['N']} has counts {full.tolist()}, got {_as_counts(self.counts).tolist()}")
            self.counts = full
        for name in ("means", "quats", "scales", "opacities"):
            check_finite(getattr(self, name).detach(), name)

    @classmethod
    def from_raw(cls, means, quats, log_scales, opacity_logits, colors, sh_degree: int | None = None, counts=None) -> Gaussians:
        """Build from unconstrained parameters (log scales, opacity logits), as optimised in 3DGS."""
        return cls(means, quats, torch.exp(log_scales), torch.sigmoid(opacity_logits), colors, sh_degree, counts)

    # ------------------------------------------------------------------ layout
    @property
    def is_packed(self) -> bool:
        """True for the packed (ragged) layout, False for the dense one."""
        return self.means.ndim == 2

    @property
    def batch_size(self) -> int:
        return int(self.counts.shape[0])

    @property
    def num_gaussians(self) -> int:
        """``N`` per set of a dense batch; all Gaussians together (``T``) of a packed one."""
        return self.means.shape[0] if self.is_packed else self.means.shape[1]

    @property
    def offsets(self) -> torch.Tensor:
        """``(B,)`` CPU int64: index of each object's first Gaussian in the packed order."""
        return torch.cumsum(self.counts, 0) - self.counts

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in _FIELDS}

    def packed(self) -> Gaussians:
        """The same Gaussians in the packed layout (a packed batch is returned as is)."""
        if self.is_packed:
            return self
        B, N = self.means.shape[:2]
        return Gaussians(*(t.reshape(B * N, *t.shape[2:]) for t in self._tensors().values()), self.sh_degree, self.counts.clone())

    def to_dense(self) -> Gaussians:
        """The dense layout ``(B, N, ...)``; a packed batch needs the same ``N >= 1`` for every object."""
        if not self.is_packed:
            return self
        n = self.counts.unique()
        if n.numel() != 1 or int(n[0]) == 0:
            raise ShapeError(f"counts: a dense batch needs the same number (>= 1) of Gaussians per object, got {self.counts.tolist()}; render or export per object (split())")
        B, N = self.batch_size, int(n[0])
        return Gaussians(*(t.reshape(B, N, *t.shape[1:]) for t in self._tensors().values()), self.sh_degree)

    def __getitem__(self, idx) -> Gaussians:
        """Select objects. Keeps the batch dimension for an int index and keeps the layout:
        a dense batch gives a dense one ``(1, N, ...)``, a packed one a packed one (``counts`` of
        length 1, possibly ``[0]``)."""
        if isinstance(idx, int):
            if not -self.batch_size <= idx < self.batch_size:
                raise IndexError(f"Gaussians index {idx}: the batch has {self.batch_size} objects")
            idx = idx % self.batch_size
            idx = slice(idx, idx + 1)
        if not self.is_packed:
            return Gaussians(*(t[idx] for t in self._tensors().values()), self.sh_degree)
        if not isinstance(idx, slice) or idx.step not in (None, 1):
            raise ShapeError(f"Gaussians index: a packed batch takes an int or a step-1 slice, got {idx!r}")
        lo, hi, _ = idx.indices(self.batch_size)
        hi = max(lo, hi)
        start = int(self.counts[:lo].sum())
        stop = start + int(self.counts[lo:hi].sum())
        return Gaussians(*(t[start:stop] for t in self._tensors().values()), self.sh_degree, self.counts[lo:hi].clone())

    def split(self) -> list[Gaussians]:
        """One batch-of-one per object, in order (same layout as ``self``; ``from_list`` inverts it)."""
        return [self[i] for i in range(self.batch_size)]

    @classmethod
    def from_list(cls, items: Sequence[Gaussians]) -> Gaussians:
        """Pack the objects of ``items`` (any layouts, any batch sizes, same colour model) in order.

        Returns a packed batch whose ``counts`` are the items' per-object counts concatenated.
        """
        items = list(items)
        if not items or not all(isinstance(g, Gaussians) for g in items):
            raise ShapeError(f"items: expected a non-empty list of Gaussians, got {[type(g).__name__ for g in items] or 'an empty list'}")
        first = items[0]
        for i, g in enumerate(items[1:], 1):
            if g.sh_degree != first.sh_degree:
                raise ShapeError(f"items[{i}]: sh_degree {g.sh_degree} differs from items[0]'s {first.sh_degree}")
            if g.colors.shape[-2:] != first.colors.shape[-2:] and first.sh_degree is not None:
                raise ShapeError(f"items[{i}]: {g.colors.shape[-2]} SH coefficients differ from items[0]'s {first.colors.shape[-2]}")
        ps = [g.packed() for g in items]
        cat = {k: torch.cat([getattr(p, k) for p in ps]) for k in _FIELDS}
        return cls(**cat, sh_degree=first.sh_degree, counts=torch.cat([p.counts for p in ps]))

    # ------------------------------------------------------------------ quantities
    def covariances(self) -> torch.Tensor:
        """World covariances ``(B, N, 3, 3)`` (``(T, 3, 3)`` packed) = ``R diag(s²) Rᵀ``."""
        R = quat_to_rotmat(self.quats)
        M = R * self.scales[..., None, :]
        return M @ M.transpose(-1, -2)

    def rgb(self, cam_centers: torch.Tensor | None = None) -> torch.Tensor:
        """Colours ``(B, V, N, 3)`` seen from camera centres ``(B, V, 3)`` (view-independent if RGB); dense only."""
        if self.is_packed:
            raise ShapeError("rgb: a packed batch has no (B, V, N) colour layout; take one object (g[i].to_dense()) or render with recon3d.render.render")
        if self.sh_degree is None:
            V = 1 if cam_centers is None else cam_centers.shape[1]
            return self.colors[:, None].expand(-1, V, -1, -1)
        if cam_centers is None:
            raise ShapeError("cam_centers: SH colours need the camera centres")
        dirs = torch.nn.functional.normalize(self.means[:, None] - cam_centers[:, :, None], dim=-1)
        return eval_sh(self.colors[:, None], dirs, self.sh_degree)

    def to(self, *args, **kwargs) -> Gaussians:
        """Move/cast the attributes (``counts`` stays on the CPU as int64)."""
        t = lambda x: x.to(*args, **kwargs)
        return Gaussians(*(t(x) for x in self._tensors().values()), self.sh_degree, self.counts.clone() if self.is_packed else None)

    def detach(self) -> Gaussians:
        return Gaussians(*(x.detach() for x in self._tensors().values()), self.sh_degree, self.counts.clone() if self.is_packed else None)
