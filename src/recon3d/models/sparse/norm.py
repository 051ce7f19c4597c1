"""Normalisation and per-object modulation of sparse voxel features.

- :class:`SparseChannelLayerNorm`: LayerNorm over the ``C`` channels of each voxel (TRELLIS's
  ``LayerNorm32`` applied to ``feats``: half-precision features are normalised in float32); keys ``weight``, ``bias``.
- :class:`SparseGroupNorm`: GroupNorm per object: the statistics of group ``g`` of object ``b``
  are taken over all of that object's voxels and the group's channels (TRELLIS's
  ``SparseGroupNorm32``, used in the mesh decoder's subdivide blocks), in one vectorised pass
  instead of a loop over objects; keys ``weight``, ``bias``.
- :func:`per_object` / :func:`modulate`: ``[B, ...]`` vectors broadcast to each object's voxels
  (adaLN's ``x * (1 + scale) + shift``).

TRELLIS also has a ``SparseLayerNorm`` that is deliberately not here: it reshapes an object's
features to ``(1, C, n)`` before an ``nn.LayerNorm(C)``, which normalises over the *voxel* axis and
fails unless ``n == C``; nothing in TRELLIS uses it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from recon3d.errors import ShapeError
from recon3d.representations import SparseVoxels

__all__ = ["SparseChannelLayerNorm", "SparseGroupNorm", "per_object", "modulate"]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision features (TRELLIS's ``*32`` norms), else the features' own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _batch_index(voxels: SparseVoxels) -> torch.Tensor:
    return voxels.coords[:, 0].long()


def per_object(values: torch.Tensor, voxels: SparseVoxels, name: str = "values") -> torch.Tensor:
    """``(N, ...)``: row ``b`` of ``values (B, ...)`` repeated over object ``b``'s voxels."""
    if not isinstance(values, torch.Tensor) or values.ndim < 1 or values.shape[0] != voxels.batch_size:
        got = list(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ShapeError(f"{name}: expected one row per object ({voxels.batch_size}, ...), got {got}")
    return values.index_select(0, _batch_index(voxels).to(values.device))


def modulate(voxels: SparseVoxels, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> SparseVoxels:
    """``feats * (1 + scale[b]) + shift[b]`` with ``scale, shift (B, C)`` per object."""
    f = voxels.feats
    if scale is not None:
        if scale.ndim != 2 or scale.shape[1] != f.shape[1]:
            raise ShapeError(f"scale: expected ({voxels.batch_size}, {f.shape[1]}), got {list(scale.shape)}")
        f = f * (1 + per_object(scale, voxels, "scale"))
    if shift is not None:
        if shift.ndim != 2 or shift.shape[1] != f.shape[1]:
            raise ShapeError(f"shift: expected ({voxels.batch_size}, {f.shape[1]}), got {list(shift.shape)}")
        f = f + per_object(shift, voxels, "shift")
    return voxels.replace(feats=f)


class SparseChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over channels of ``feats (N, C)`` (float32 for half inputs, cast back)."""

    def forward(self, voxels: SparseVoxels) -> SparseVoxels:  # type: ignore[override]
        if voxels.num_channels != self.normalized_shape[0]:
            raise ShapeError(f"voxels.feats: expected {self.normalized_shape[0]} channels, got {voxels.num_channels}")
        x = voxels.feats
        wd = _work_dtype(x.dtype)
        w = None if self.weight is None else self.weight.to(wd)
        b = None if self.bias is None else self.bias.to(wd)
        y = F.layer_norm(x.to(wd), self.normalized_shape, w, b, self.eps)
        return voxels.replace(feats=y.to(x.dtype))


class SparseGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per object and group (module docstring); float32 for half inputs.

    ``SparseGroupNorm(32, C)`` is TRELLIS's ``SparseGroupNorm32(32, C)``. An object with no voxels
    has no rows to normalise (its statistics are never formed).
    """

    def forward(self, voxels: SparseVoxels) -> SparseVoxels:  # type: ignore[override]
        n, c = voxels.feats.shape
        if c != self.num_channels:
            raise ShapeError(f"voxels.feats: expected {self.num_channels} channels, got {c}")
        g, bsz = self.num_groups, voxels.batch_size
        wd = _work_dtype(voxels.feats.dtype)
        x = voxels.feats.to(wd).reshape(n, g, c // g)
        b = _batch_index(voxels)
        count = (voxels.counts.to(x.device, wd) * (c // g)).clamp_min(1)[:, None]  # (B, 1)
        mean = x.new_zeros(bsz, g).index_add_(0, b, x.sum(-1)) / count
        xc = x - mean.index_select(0, b)[:, :, None]
        var = x.new_zeros(bsz, g).index_add_(0, b, xc.square().sum(-1)) / count  # biased, as torch
        y = (xc * torch.rsqrt(var + self.eps).index_select(0, b)[:, :, None]).reshape(n, c)
        if self.affine:
            y = y * self.weight.to(wd) + self.bias.to(wd)
        return voxels.replace(feats=y.to(voxels.feats.dtype))
