"""Dense building blocks of TRELLIS's networks, named as upstream so official weights load strictly.

Upstream (microsoft/TRELLIS @ 6b0d647, MIT): ``trellis/modules/{norm,spatial,utils}.py``,
``trellis/modules/attention/modules.py``, ``trellis/modules/transformer/{blocks,modulated}.py`` and
``TimestepEmbedder`` of ``trellis/models/sparse_structure_flow.py``. Written from a reading of
those files; the state-dict names below are upstream's:

* :class:`ChannelLayerNorm32` (``weight``, ``bias``): LayerNorm over the channel axis ``1`` of a
  ``(B, C, *spatial)`` tensor, computed in float32.
* :class:`MultiHeadRMSNorm` (``gamma (H, D)``): ``normalize(x) * gamma * sqrt(D)`` per head.
* :class:`MultiHeadAttention`: ``to_qkv`` (self) or ``to_q`` + ``to_kv`` (cross), optional
  ``q_rms_norm``/``k_rms_norm``, ``to_out``.
* :class:`FeedForwardNet`: ``mlp.0`` Linear(C, rC), GELU(tanh), ``mlp.2`` Linear(rC, C).
* :class:`ModulatedTransformerCrossBlock`: ``norm2`` (the only affine norm), ``self_attn``,
  ``cross_attn``, ``mlp``, ``adaLN_modulation.1`` Linear(C, 6C) unless the modulation is shared.
* :class:`TimestepEmbedder`: ``mlp.0`` Linear(256, C), SiLU, ``mlp.2`` Linear(C, C).

Half precision follows upstream's ``use_fp16``: :func:`convert_module_to_f16` casts the
parameters of Linear/Conv layers only (norms, RMS gammas and buffers stay float32), and every norm
here computes in float32 and returns the input's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "LayerNorm32", "GroupNorm32", "ChannelLayerNorm32", "MultiHeadRMSNorm", "MultiHeadAttention", "FeedForwardNet",
    "ModulatedTransformerCrossBlock", "TimestepEmbedder", "timestep_embedding", "absolute_position_embedding",
    "grid_coordinates", "pixel_shuffle_3d", "patchify", "unpatchify", "zero_module", "convert_module_to_f16",
    "convert_module_to_f32",
]

#: Layer types whose parameters upstream's ``convert_module_to_f16`` casts (the dense ones).
_HALF_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def convert_module_to_f16(m: nn.Module) -> None:
    """Cast the parameters of a Linear/Conv module to float16 (use with ``module.apply``)."""
    if isinstance(m, _HALF_TYPES):
        for p in m.parameters():
            p.data = p.data.half()


def convert_module_to_f32(m: nn.Module) -> None:
    """Undo :func:`convert_module_to_f16`."""
    if isinstance(m, _HALF_TYPES):
        for p in m.parameters():
            p.data = p.data.float()


def zero_module(m: nn.Module) -> nn.Module:
    """Zero every parameter of ``m`` in place and return it (zero-init residual branches)."""
    for p in m.parameters():
        p.detach().zero_()
    return m


# ------------------------------------------------------------------------------------ norms
class LayerNorm32(nn.LayerNorm):
    """LayerNorm over the last axis, computed in float32, returned in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32, returned in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class ChannelLayerNorm32(LayerNorm32):
    """LayerNorm over the channel axis of ``(B, C, *spatial)``; same keys as ``nn.LayerNorm(C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moved = x.movedim(1, -1)
        return super().forward(moved).movedim(-1, 1).contiguous()


class MultiHeadRMSNorm(nn.Module):
    """Per-head RMS norm of ``(..., H, D)``: ``x / |x| * sqrt(D) * gamma`` (gamma ``(H, D)``, ones)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x.float(), dim=-1) * self.gamma * self.scale).to(x.dtype)


# -------------------------------------------------------------------------------- attention
def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(B, L, H, D)`` q and ``(B, S, H, D)`` k/v -> ``(B, L, H, D)``, softmax scale 1/sqrt(D)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class MultiHeadAttention(nn.Module):
    """Full multi-head attention over ``(B, L, C)`` tokens, self or cross (upstream's dense class).

    Args:
        channels: token width ``C`` (divisible by ``num_heads``).
        num_heads: heads ``H``; head width ``D = C / H``.
        ctx_channels: context width for cross-attention (default ``C``).
        type: ``"self"`` (one ``to_qkv``) or ``"cross"`` (``to_q`` on x, ``to_kv`` on the context).
        qkv_bias: bias on the projections in.
        qk_rms_norm: per-head RMS norm on queries and keys (after the projection).

    Upstream's ``attn_mode="windowed"`` and dense RoPE are not implemented there either (windowed
    raises, and the dense flow model cannot run with RoPE), so neither exists here.
    """

    def __init__(self, channels: int, num_heads: int, ctx_channels: int | None = None, type: str = "self",
                 qkv_bias: bool = True, qk_rms_norm: bool = False):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} is not divisible by num_heads {num_heads}")
        if type not in ("self", "cross"):
            raise ValueError(f"type: expected 'self' or 'cross', got {type!r}")
        self.channels, self.num_heads, self.head_dim = channels, num_heads, channels // num_heads
        self.ctx_channels = channels if ctx_channels is None else ctx_channels
        self._type, self.qk_rms_norm = type, qk_rms_norm
        if type == "self":
            self.to_qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        else:
            self.to_q = nn.Linear(channels, channels, bias=qkv_bias)
            self.to_kv = nn.Linear(self.ctx_channels, 2 * channels, bias=qkv_bias)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(self.head_dim, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, L, C)``, ``context (B, S, C_ctx)`` for cross-attention -> ``(B, L, C)``."""
        B, L, _ = x.shape
        H = self.num_heads
        if self._type == "self":
            # Projection rows are ordered (q|k|v, head, dim), as upstream's reshape (B, L, 3, H, D).
            q, k, v = self.to_qkv(x).reshape(B, L, 3, H, self.head_dim).unbind(2)
        else:
            q = self.to_q(x).reshape(B, L, H, self.head_dim)
            k, v = self.to_kv(context).reshape(B, context.shape[1], 2, H, self.head_dim).unbind(2)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        return self.to_out(_sdpa(q, k, v).reshape(B, L, self.channels))


class FeedForwardNet(nn.Module):
    """``Linear(C, rC) -> GELU(tanh) -> Linear(rC, C)`` under the key ``mlp.{0,2}``."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class ModulatedTransformerCrossBlock(nn.Module):
    """DiT block with adaLN modulation from a ``(B, C)`` vector and cross-attention to a condition.

    ``x = x + g1 * SA(LN1(x) * (1 + s1) + b1)`` (LN1 non-affine, eps 1e-6; queries/keys RMS-normed
    with ``qk_rms_norm``), ``x = x + CA(LN2(x), cond)`` (LN2 affine, no modulation, no gate),
    ``x = x + g2 * MLP(LN3(x) * (1 + s2) + b2)``; ``(b1, s1, g1, b2, s2, g2)`` are the six chunks
    of ``adaLN_modulation(mod)`` = ``Linear(SiLU(mod))`` — or ``mod`` itself (``(B, 6C)``) with
    ``share_mod``, when the model computes one modulation for every block.
    """

    def __init__(self, channels: int, ctx_channels: int, num_heads: int, mlp_ratio: float = 4.0,
                 use_checkpoint: bool = False, qk_rms_norm: bool = False, qk_rms_norm_cross: bool = False,
                 qkv_bias: bool = True, share_mod: bool = False):
        super().__init__()
        self.use_checkpoint, self.share_mod = use_checkpoint, share_mod
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = MultiHeadAttention(channels, num_heads, type="self", qkv_bias=qkv_bias, qk_rms_norm=qk_rms_norm)
        self.cross_attn = MultiHeadAttention(channels, num_heads, ctx_channels=ctx_channels, type="cross", qkv_bias=qkv_bias,
                                             qk_rms_norm=qk_rms_norm_cross)
        self.mlp = FeedForwardNet(channels, mlp_ratio)
        if not share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels, bias=True))

    def _forward(self, x: torch.Tensor, mod: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        m = mod if self.share_mod else self.adaLN_modulation(mod)
        shift1, scale1, gate1, shift2, scale2, gate2 = (c.unsqueeze(1) for c in m.chunk(6, dim=1))
        x = x + gate1 * self.self_attn(self.norm1(x) * (1 + scale1) + shift1)
        x = x + self.cross_attn(self.norm2(x), context)
        return x + gate2 * self.mlp(self.norm3(x) * (1 + scale2) + shift2)

    def forward(self, x: torch.Tensor, mod: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``x (B, L, C)``, ``mod (B, C)`` (``(B, 6C)`` with share_mod), ``context (B, S, C_ctx)``."""
        if self.use_checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, mod, context, use_reentrant=False)
        return self._forward(x, mod, context)


# ------------------------------------------------------------------------------- embeddings
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``(B,)`` times (TRELLIS feeds ``t * 1000``) -> ``(B, dim)`` float32 ``[cos(t f), sin(t f)]``,
    ``f_i = max_period^(-i / (dim // 2))``; an odd ``dim`` gets one zero column at the end."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """``(B,)`` times -> ``(B, C)``: :func:`timestep_embedding` (256) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


def grid_coordinates(resolution: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(R^3, 3)`` integer ``(x, y, z)`` of a ``R^3`` grid, x slowest (the flattening of ``(R, R, R)``)."""
    axes = torch.arange(resolution, device=device)
    return torch.stack(torch.meshgrid(axes, axes, axes, indexing="ij"), dim=-1).reshape(-1, 3)


def absolute_position_embedding(coords: torch.Tensor, channels: int) -> torch.Tensor:
    """``(N, A)`` positions -> ``(N, channels)`` float32 sin/cos embedding (TRELLIS's APE).

    Each axis gets ``F = channels // A // 2`` frequencies ``f_i = 10000^(-i / F)`` and contributes
    ``[sin(p f), cos(p f)]`` (``2F`` columns), axes in order; the remaining
    ``channels - 2 F A`` columns are zero (1024 channels, 3 axes: 1020 used, 4 zero).
    """
    n, a = coords.shape
    f = channels // a // 2
    freqs = 1.0 / (10000.0 ** (torch.arange(f, dtype=torch.float32, device=coords.device) / f))
    phase = coords.float()[..., None] * freqs  # (N, A, F)
    emb = torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1).reshape(n, a * 2 * f)
    return F.pad(emb, (0, channels - emb.shape[1]))


# ---------------------------------------------------------------------------------- spatial
def pixel_shuffle_3d(x: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """``(B, C r^3, X, Y, Z)`` -> ``(B, C, rX, rY, rZ)``: channel ``c r^3 + i r^2 + j r + k`` of voxel
    ``(x, y, z)`` becomes voxel ``(r x + i, r y + j, r z + k)`` of channel ``c``."""
    r = scale_factor
    B, Cr, X, Y, Z = x.shape
    C = Cr // r**3
    y = x.reshape(B, C, r, r, r, X, Y, Z).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return y.reshape(B, C, X * r, Y * r, Z * r)


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, X, Y, Z)`` -> ``(B, C p^3, X/p, Y/p, Z/p)``: channel ``c p^3 + i p^2 + j p + k`` of
    patch ``(u, v, w)`` holds voxel ``(p u + i, p v + j, p w + k)`` (the inverse of a pixel shuffle)."""
    p = patch_size
    B, C, X, Y, Z = x.shape
    y = x.reshape(B, C, X // p, p, Y // p, p, Z // p, p).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return y.reshape(B, C * p**3, X // p, Y // p, Z // p)


def unpatchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Inverse of :func:`patchify` (a 3-D pixel shuffle by ``patch_size``)."""
    return pixel_shuffle_3d(x, patch_size)
