"""Selective Attention Module of M3D (paper §III-B, eqs. 1-2).

Feature maps ``(B, C, H, W)`` go through two *iterations*; iteration ``i`` has ``depths[i]``
layers, the first half :class:`MixerBlock` (Adaptive Feature Mixer) and the second half
:class:`AttentionBlock` (self-attention). The paper's sizes are ``depths = (8, 4)``:
N1 = 8 (4 mixer + 4 attention), then N2 = 4 (2 + 2).

Mixer (eq. 1-2): the channels are split in half; one half goes through a selective SSM scanned
over the image along ``scan_directions`` directions (long range, :mod:`recon3d.models.ssm`),
the other through a depthwise + pointwise convolution (local); the halves are concatenated,
projected, and followed by an MLP. Self-attention blocks use ``F.scaled_dot_product_attention``.

Paper vs official code: the official code (Dual-S3D) loads MambaVision-B from the Hugging Face
hub instead of a module written to the paper; its mixer scans the flattened tokens in one
direction with a 1-D convolution (``scan_directions=1``, ``conv="1d"`` reproduce that token
order and convolution here).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from recon3d.errors import ConfigError
from recon3d.models.ssm import cross_merge, cross_scan, selective_scan
from recon3d.utils.checks import check_shape

__all__ = ["SelectiveSSM2d", "MixerBlock", "AttentionBlock", "SelectiveAttentionModule"]


class SelectiveSSM2d(nn.Module):
    """Mamba (S6) selective SSM over a 2-D map scanned along ``directions`` orders.

    ``(B, C, H, W) -> (B, C, H, W)``. Each direction has its own ``delta``/``B``/``C`` projection,
    ``A`` and ``D``; the directions are scanned in one grouped call and merged by summation.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 8,
        directions: int = 4,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        backend: Literal["auto", "torch", "fused_cpu", "mamba_ssm"] = "auto",
    ):
        super().__init__()
        self.dim, self.d_state, self.k, self.backend = dim, d_state, directions, backend
        self.dt_rank = dt_rank or max(1, math.ceil(dim / 16))
        k, r, n = directions, self.dt_rank, d_state
        self.x_proj = nn.Parameter(torch.randn(k, r + 2 * n, dim) / math.sqrt(dim))
        self.dt_proj_weight = nn.Parameter(torch.empty(k, dim, r).uniform_(-(r**-0.5), r**-0.5))
        dt = torch.exp(torch.rand(k, dim) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp_min(1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(k * dim, 1))
        self.D = nn.Parameter(torch.ones(k * dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, H, W)`` -> ``(B, C, H, W)``."""
        check_shape(x, f"B {self.dim} H W", "x")
        b, c, h, w = x.shape
        k, r, n = self.k, self.dt_rank, self.d_state
        xs = cross_scan(x, k)  # (B, K, C, L)
        proj = torch.einsum("bkcl,kjc->bkjl", xs, self.x_proj)  # (B, K, r+2N, L)
        dts, Bs, Cs = proj.split([r, n, n], dim=2)
        dts = torch.einsum("bkrl,kcr->bkcl", dts, self.dt_proj_weight)
        y = selective_scan(
            xs.reshape(b, k * c, -1), dts.reshape(b, k * c, -1), -torch.exp(self.A_log.float()), Bs, Cs,
            self.D.float(), None, self.dt_bias.reshape(-1).float(), delta_softplus=True, backend=self.backend,
        )
        return cross_merge(y.view(b, k, c, -1), h, w).view(b, c, h, w)


class MixerBlock(nn.Module):
    """Adaptive Feature Mixer block: ``x + mix(norm(x))`` then ``x + mlp(norm(x))`` on ``(B, C, H, W)``.

    ``mix``: linear to ``C`` channels, split in half; half 1 -> depthwise conv + SiLU -> SSM
    (``F_long``), half 2 -> depthwise conv + SiLU (``F_short``); concat -> linear.
    """

    def __init__(self, dim: int, d_state: int = 8, directions: int = 4, conv: Literal["2d", "1d"] = "2d",
                 mlp_ratio: float = 4.0, backend: Literal["auto", "torch", "fused_cpu", "mamba_ssm"] = "auto"):
        super().__init__()
        if dim % 2:
            raise ConfigError(f"MixerBlock: dim must be even to split channels in half, got {dim}")
        half = dim // 2
        self.conv_kind = conv
        self.norm1 = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, dim)
        if conv == "2d":
            self.conv_long = nn.Conv2d(half, half, 3, padding=1, groups=half)
            self.conv_short = nn.Conv2d(half, half, 3, padding=1, groups=half)
        elif conv == "1d":
            self.conv_long = nn.Conv1d(half, half, 3, padding=1, groups=half)
            self.conv_short = nn.Conv1d(half, half, 3, padding=1, groups=half)
        else:
            raise ConfigError(f"MixerBlock: conv must be '2d' or '1d', got {conv!r}")
        self.ssm = SelectiveSSM2d(half, d_state=d_state, directions=directions, backend=backend)
        self.out_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _mlp(dim, mlp_ratio)

    def _conv(self, conv: nn.Module, t: torch.Tensor) -> torch.Tensor:
        if self.conv_kind == "2d":
            return conv(t)
        b, c, h, w = t.shape
        return conv(t.flatten(2)).view(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, H, W)`` -> ``(B, C, H, W)``."""
        b, c, h, w = x.shape
        t = self.in_proj(self.norm1(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        f1, f2 = t.chunk(2, dim=1)  # F_roi,1 / F_roi,2
        f_long = self.ssm(F.silu(self._conv(self.conv_long, f1)))
        f_short = F.silu(self._conv(self.conv_short, f2))
        mixed = self.out_proj(torch.cat([f_long, f_short], 1).permute(0, 2, 3, 1))
        tok = x.permute(0, 2, 3, 1) + mixed
        tok = tok + self.mlp(self.norm2(tok))
        return tok.permute(0, 3, 1, 2)


class AttentionBlock(nn.Module):
    """Pre-norm multi-head self-attention (sdpa) + MLP over the ``H*W`` tokens of ``(B, C, H, W)``."""

    def __init__(self, dim: int, num_heads: int = 8, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"AttentionBlock: dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, H, W)`` -> ``(B, C, H, W)``."""
        b, c, h, w = x.shape
        tok = x.flatten(2).transpose(1, 2)  # (B, L, C)
        q, k, v = self.qkv(self.norm1(tok)).view(b, -1, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
        tok = tok + self.proj(a)
        tok = tok + self.mlp(self.norm2(tok))
        return tok.transpose(1, 2).reshape(b, c, h, w)


def _mlp(dim: int, ratio: float) -> nn.Sequential:
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class SelectiveAttentionModule(nn.Module):
    """Iterated mixer + self-attention stages on ``(B, C, H, W)`` features (paper: ``depths=(8, 4)``).

    Args:
        dim: channels ``C``.
        depths: layers per iteration; in each, the first ``depth // 2`` are mixer blocks and the
            rest self-attention blocks.
        num_heads: attention heads.
        d_state: SSM state size ``N``.
        scan_directions: 1, 2 or 4 scan orders for the SSM half (4 = VMamba cross-scan).
        conv: ``"2d"`` (paper: CNN on the image grid) or ``"1d"`` (MambaVision's token conv).
        mlp_ratio: hidden width of the MLPs.
        backend: selective-scan backend.
    """

    def __init__(
        self,
        dim: int = 256,
        depths: tuple[int, ...] | list[int] = (8, 4),
        num_heads: int = 8,
        d_state: int = 8,
        scan_directions: int = 4,
        conv: Literal["2d", "1d"] = "2d",
        mlp_ratio: float = 4.0,
        backend: Literal["auto", "torch", "fused_cpu", "mamba_ssm"] = "auto",
    ):
        super().__init__()
        self.dim = dim
        stages = []
        for depth in depths:
            if depth < 1:
                raise ConfigError(f"SelectiveAttentionModule: every depth must be >= 1, got {list(depths)}")
            n_mix = depth // 2
            blocks = [MixerBlock(dim, d_state, scan_directions, conv, mlp_ratio, backend) for _ in range(n_mix)]
            blocks += [AttentionBlock(dim, num_heads, mlp_ratio) for _ in range(depth - n_mix)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.norm = nn.GroupNorm(1, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, H, W)`` -> context features ``(B, C, H, W)``."""
        check_shape(x, f"B {self.dim} H W", "x")
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)
