"""Sparse building blocks of TRELLIS's structured-latent networks, on recon3d's sparse ops.

Upstream (microsoft/TRELLIS @ 6b0d647, MIT): ``trellis/modules/sparse/transformer/{blocks,modulated}.py``
and ``SparseResBlock3d`` of ``trellis/models/structured_latent_flow.py``. Written from a reading of
those files on :class:`~recon3d.representations.SparseVoxels` (``feats (N, C)``, rows of one object
contiguous); the state-dict names are upstream's:

* :class:`SparseFeedForwardNet`: ``mlp.0`` SparseLinear(C, rC), GELU(tanh), ``mlp.2`` SparseLinear(rC, C).
* :class:`ModulatedSparseTransformerCrossBlock`: ``norm2`` (the only affine norm), ``self_attn``,
  ``cross_attn``, ``mlp``, ``adaLN_modulation.1`` Linear(C, 6C) unless the modulation is shared.
* :class:`SparseResBlock3d`: ``norm1`` (affine), ``conv1``/``conv2`` (``conv.weight (Co, 3, 3, 3, Ci)``),
  ``emb_layers.1`` Linear(E, 2 Co), ``skip_connection`` (SparseLinear, only when channels change).
* :class:`SparseTransformerBlock` (the SLAT VAE's): ``attn`` (full or swin self-attention), ``mlp``;
  both norms non-affine (no keys).
* :class:`TrellisSparseDownsample`: upstream's down-sampling arithmetic (below), no parameters.

Upstream's ``SparseDownsample`` pools with ``torch.scatter_reduce(zeros, ..., reduce="mean")``,
whose default ``include_self=True`` counts the zero it starts from: a coarse cell over ``n`` fine
voxels holds ``sum / (n + 1)``, not the mean. The released SLAT flow was trained with that, so the
res blocks here pool the same way (measured on the tiny parity fixture: with the plain mean the
first down-sampling block already differs from upstream by 1.7, the whole forward by 0.57).

Per-object vectors (adaLN's ``(B, C)`` chunks) broadcast to each object's voxels through
:func:`~recon3d.models.sparse.modulate` / :func:`~recon3d.models.sparse.per_object`, so the voxels of
one object never see another object's time or condition.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from recon3d.errors import ShapeError
from recon3d.models.sparse import (
    SparseDownsample,
    SparseLinear,
    SparseMultiHeadAttention,
    SparseSubMConv3d,
    SparseUpsample,
    modulate,
    per_object,
    spatial_cache,
)
from recon3d.models.trellis.modules import LayerNorm32, zero_module
from recon3d.representations import SparseVoxels

__all__ = ["SparseFeedForwardNet", "ModulatedSparseTransformerCrossBlock", "SparseTransformerBlock", "SparseResBlock3d", "TrellisSparseDownsample",
           "convert_sparse_module_to_f16", "convert_sparse_module_to_f32", "sparse_norm"]


def convert_sparse_module_to_f16(m: nn.Module) -> None:
    """Upstream's ``convert_module_to_f16`` for sparse models: Linear (incl. SparseLinear) and sparse
    conv parameters to float16 (norms and embedders stay float32); use with ``module.apply``."""
    if isinstance(m, (nn.Linear, SparseSubMConv3d, nn.Conv3d)):
        for p in m.parameters():
            p.data = p.data.half()


def convert_sparse_module_to_f32(m: nn.Module) -> None:
    """Undo :func:`convert_sparse_module_to_f16`."""
    if isinstance(m, (nn.Linear, SparseSubMConv3d, nn.Conv3d)):
        for p in m.parameters():
            p.data = p.data.float()


def sparse_norm(norm: nn.Module, x: SparseVoxels) -> SparseVoxels:
    """Apply a dense per-channel norm (``LayerNorm32``) to ``x.feats (N, C)``, coordinates kept."""
    return x.replace(feats=norm(x.feats))


class SparseFeedForwardNet(nn.Module):
    """``SparseLinear(C, rC) -> GELU(tanh) -> SparseLinear(rC, C)`` under ``mlp.{0,2}``."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(SparseLinear(channels, hidden), _SparseGELU(), SparseLinear(hidden, channels))

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        return self.mlp(x)


class _SparseGELU(nn.Module):
    """GELU (tanh approximation) on the features; no parameters (index 1 of ``mlp``)."""

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        return x.replace(feats=F.gelu(x.feats, approximate="tanh"))


class ModulatedSparseTransformerCrossBlock(nn.Module):
    """Sparse DiT block: per-object adaLN, full self-attention within each object, cross-attention
    of each object's voxels to its own condition tokens.

    ``x += g1 * SA(LN1(x) (1 + s1) + b1)`` (LN1 non-affine eps 1e-6), ``x += CA(LN2(x), cond)`` (LN2
    affine, no modulation, no gate), ``x += g2 * MLP(LN3(x) (1 + s2) + b2)``; ``(b1, s1, g1, b2, s2, g2)``
    are the six ``(B, C)`` chunks of ``adaLN_modulation(mod)`` (or ``mod (B, 6C)`` itself with share_mod).
    Only ``attn_mode="full"`` (the SLAT flow's) is built here; upstream's windowed variants belong
    to the VAE's non-modulated blocks.
    """

    def __init__(self, channels: int, ctx_channels: int, num_heads: int, mlp_ratio: float = 4.0,
                 use_checkpoint: bool = False, qk_rms_norm: bool = False, qk_rms_norm_cross: bool = False,
                 qkv_bias: bool = True, share_mod: bool = False, backend: str = "auto"):
        super().__init__()
        self.use_checkpoint, self.share_mod, self.channels = use_checkpoint, share_mod, channels
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = SparseMultiHeadAttention(channels, num_heads, type="self", attn_mode="full", qkv_bias=qkv_bias,
                                                  qk_rms_norm=qk_rms_norm, backend=backend)
        self.cross_attn = SparseMultiHeadAttention(channels, num_heads, ctx_channels=ctx_channels, type="cross", attn_mode="full",
                                                   qkv_bias=qkv_bias, qk_rms_norm=qk_rms_norm_cross, backend=backend)
        self.mlp = SparseFeedForwardNet(channels, mlp_ratio)
        if not share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels, bias=True))

    def _forward(self, feats: torch.Tensor, x: SparseVoxels, mod: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x.replace(feats=feats)
        m = mod if self.share_mod else self.adaLN_modulation(mod)
        shift1, scale1, gate1, shift2, scale2, gate2 = m.chunk(6, dim=1)
        h = self.self_attn(modulate(sparse_norm(self.norm1, x), scale1, shift1))
        f = x.feats + h.feats * per_object(gate1, x, "gate")
        h = self.cross_attn(sparse_norm(self.norm2, x.replace(feats=f)), context)
        f = f + h.feats
        h = self.mlp(modulate(sparse_norm(self.norm3, x.replace(feats=f)), scale2, shift2))
        return f + h.feats * per_object(gate2, x, "gate")

    def forward(self, x: SparseVoxels, mod: torch.Tensor, context: torch.Tensor) -> SparseVoxels:
        """``x feats (N, C)``, ``mod (B, C)`` (``(B, 6C)`` with share_mod), ``context (B, L, C_ctx)``."""
        if x.num_channels != self.channels:
            raise ShapeError(f"x.feats: expected {self.channels} channels, got {x.num_channels}")
        if self.use_checkpoint and torch.is_grad_enabled():
            f = torch.utils.checkpoint.checkpoint(self._forward, x.feats, x, mod, context, use_reentrant=False)
        else:
            f = self._forward(x.feats, x, mod, context)
        return x.replace(feats=f)


class SparseTransformerBlock(nn.Module):
    """Plain sparse transformer block: ``x += Attn(LN1(x))``, ``x += MLP(LN2(x))`` (both LayerNorms
    non-affine, eps 1e-6), upstream's ``SparseTransformerBlock`` with ``ln_affine=False``.

    ``attn_mode="windowed"`` with ``window_size`` ``w`` and ``shift_window`` ``s`` attends within the
    ``w^3`` windows of ``coords + s`` (the SLAT VAE's swin blocks: ``s = w // 2`` on odd blocks);
    ``"full"`` within each object. ``forward(x feats (N, C)) -> feats (N, C)``.
    """

    def __init__(self, channels: int, num_heads: int, mlp_ratio: float = 4.0, attn_mode: str = "full",
                 window_size: int | None = None, shift_window: int = 0, use_checkpoint: bool = False,
                 qk_rms_norm: bool = False, qkv_bias: bool = True, backend: str = "auto"):
        super().__init__()
        self.channels, self.use_checkpoint = channels, use_checkpoint
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.attn = SparseMultiHeadAttention(channels, num_heads, type="self", attn_mode=attn_mode, window_size=window_size,
                                             shift_window=shift_window, qkv_bias=qkv_bias, qk_rms_norm=qk_rms_norm, backend=backend)
        self.mlp = SparseFeedForwardNet(channels, mlp_ratio)

    def _forward(self, feats: torch.Tensor, x: SparseVoxels) -> torch.Tensor:
        x = x.replace(feats=feats)
        f = feats + self.attn(sparse_norm(self.norm1, x)).feats
        return f + self.mlp(sparse_norm(self.norm2, x.replace(feats=f))).feats

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        if x.num_channels != self.channels:
            raise ShapeError(f"x.feats: expected {self.channels} channels, got {x.num_channels}")
        if self.use_checkpoint and torch.is_grad_enabled():
            f = torch.utils.checkpoint.checkpoint(self._forward, x.feats, x, use_reentrant=False)
        else:
            f = self._forward(x.feats, x)
        return x.replace(feats=f)


class TrellisSparseDownsample(nn.Module):
    """Down-sampling by ``factor`` as upstream computes it: coarse cell = ``sum / (n + 1)`` of its
    ``n`` fine voxels (module docstring). Coordinates, row order and the record that
    :class:`~recon3d.models.sparse.SparseUpsample` follows back are :func:`~recon3d.models.sparse.downsample`'s.

    ``forward(voxels feats (N, C)) -> (M, C)`` on the ``ceil(resolution / factor)`` grid.
    """

    def __init__(self, factor: int = 2):
        super().__init__()
        self.inner = SparseDownsample(factor)
        self.factor = self.inner.factor

    def forward(self, voxels: SparseVoxels) -> SparseVoxels:
        out = self.inner(voxels)
        rec = spatial_cache(out.coords)[("downsample", self.factor)]
        n = torch.bincount(rec.inverse, minlength=out.num_voxels).to(out.feats.dtype)
        return out.replace(feats=out.feats * (n / (n + 1))[:, None])


class SparseResBlock3d(nn.Module):
    """Time-modulated sparse residual block, optionally changing resolution first.

    ``x = updown(x)`` (:class:`TrellisSparseDownsample` (2), upstream's ``sum / (n + 1)`` pooling, or
    SparseUpsample(2) back through the paired downsample), then ``h = conv2(SiLU(LN2(conv1(SiLU(LN1(x)))) (1 + scale) + shift))`` with
    ``(scale, shift)`` = the two ``(B, Co)`` chunks of ``emb_layers(emb)`` (scale first), and
    ``out = h + skip(x)``. LN1 affine, LN2 non-affine (eps 1e-6); ``conv2`` starts at zero, so a fresh
    block is its skip path. Convs are 3^3 submanifold (coordinates kept).

    Args: channels ``Ci``, emb_channels ``E``, out_channels ``Co`` (default ``Ci``), downsample,
    upsample (not both), conv_backend (:class:`SparseSubMConv3d`'s).
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, downsample: bool = False,
                 upsample: bool = False, conv_backend: str = "auto"):
        super().__init__()
        if downsample and upsample:
            raise ShapeError("SparseResBlock3d: downsample and upsample are exclusive")
        self.channels, self.emb_channels = channels, emb_channels
        self.out_channels = out_channels or channels
        self.downsample, self.upsample = downsample, upsample
        co = self.out_channels
        self.norm1 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm2 = LayerNorm32(co, elementwise_affine=False, eps=1e-6)
        self.conv1 = SparseSubMConv3d(channels, co, 3, backend=conv_backend)
        self.conv2 = zero_module(SparseSubMConv3d(co, co, 3, backend=conv_backend))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * co, bias=True))
        self.skip_connection = SparseLinear(channels, co) if channels != co else nn.Identity()
        self.updown = TrellisSparseDownsample(2) if downsample else SparseUpsample(2) if upsample else None

    def forward(self, x: SparseVoxels, emb: torch.Tensor) -> SparseVoxels:
        """``x feats (N, Ci)``, ``emb (B, E)`` -> ``feats (N', Co)`` (``N'`` after the resolution change)."""
        if x.num_channels != self.channels:
            raise ShapeError(f"x.feats: expected {self.channels} channels, got {x.num_channels}")
        scale, shift = self.emb_layers(emb).to(x.feats.dtype).chunk(2, dim=1)
        if self.updown is not None:
            x = self.updown(x)
        h = x.replace(feats=F.silu(self.norm1(x.feats)))
        h = self.conv1(h)
        h = modulate(sparse_norm(self.norm2, h), scale, shift)
        h = self.conv2(h.replace(feats=F.silu(h.feats)))
        return h.replace(feats=h.feats + self.skip_connection(x).feats)
