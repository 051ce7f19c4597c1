"""Transformer building blocks of VGGT (Wang et al. 2025), written for recon3d.

Module attribute names follow the official checkpoint (``facebookresearch/vggt``: ``norm1``,
``attn.qkv``, ``attn.q_norm``, ``attn.k_norm``, ``attn.proj``, ``ls1.gamma``, ``norm2``,
``mlp.fc1``, ``mlp.fc2``, ``ls2.gamma``) so that the released state dict loads by name.

- :class:`Rope2D`: rotary position embedding over ``(y, x)`` patch coordinates; the first half of
  each head's channels rotates with ``y``, the second half with ``x``; within each half the
  channels are split in two halves (rotate-half convention), frequencies ``base^(-2i/d)`` with
  ``d`` = head_dim / 2.
- :class:`Block`: pre-norm transformer block with layer scale.
- :class:`DinoV2`: the DINOv2 ViT with register tokens VGGT uses as its patch embedding (only its
  final-normed patch tokens are read).

``transformers``' ``Dinov2WithRegistersModel`` is not used: its keys
(``embeddings.*``, ``encoder.layer.{i}.attention.attention.{query,key,value}``) split q/k/v and do
not match ``aggregator.patch_embed.blocks.{i}.attn.qkv``, and its position-embedding interpolation
differs, so the official weights would need a conversion plus a numerical difference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Rope2D", "patch_positions", "Attention", "Mlp", "LayerScale", "Block", "DinoV2"]


def patch_positions(n: int, grid_h: int, grid_w: int, n_special: int, device=None) -> torch.Tensor:
    """Integer RoPE positions ``(n, n_special + grid_h * grid_w, 2)`` as ``(y, x)``.

    Special tokens (camera, registers) get ``(0, 0)``; patch ``(r, c)`` (row-major) gets
    ``(r + 1, c + 1)`` so that no patch shares the specials' position.
    """
    r = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
    c = torch.arange(grid_w, device=device).repeat(grid_h)
    pos = torch.stack([r, c], -1) + 1
    pos = torch.cat([torch.zeros(n_special, 2, dtype=pos.dtype, device=device), pos], 0)
    return pos[None].expand(n, -1, -1)


class Rope2D(nn.Module):
    """2-D rotary embedding with base ``base`` (VGGT: 100). No parameters."""

    def __init__(self, base: float = 100.0):
        super().__init__()
        self.base = float(base)

    def _rotate(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        # x (B, H, N, d), p (B, N) integer positions along one axis.
        d = x.shape[-1]
        inv = self.base ** -(torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
        ang = p.to(torch.float32)[..., None] * inv  # (B, N, d/2)
        ang = torch.cat([ang, ang], -1).to(x.dtype)[:, None]  # (B, 1, N, d)
        x1, x2 = x.chunk(2, -1)
        return x * ang.cos() + torch.cat([-x2, x1], -1) * ang.sin()

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, heads, N, head_dim)`` (head_dim divisible by 4), ``pos`` ``(B, N, 2)`` → same shape as ``x``."""
        y_part, x_part = x.chunk(2, -1)
        return torch.cat([self._rotate(y_part, pos[..., 0]), self._rotate(x_part, pos[..., 1])], -1)


class Attention(nn.Module):
    """Multi-head self-attention (SDPA) with fused ``qkv``, optional per-head LayerNorm on q and k
    and optional RoPE. ``(B, N, C)`` → ``(B, N, C)``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True, qk_norm: bool = False,
                 rope: Rope2D | None = None, norm_eps: float = 1e-5):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} does not divide the width {dim}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.rope = rope

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None and pos is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """``fc1`` → GELU (erf) → ``fc2``."""

    def __init__(self, dim: int, hidden: int, out: int | None = None, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out or dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` (``init`` everywhere at construction)."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``. ``(B, N, C)`` → ``(B, N, C)``.

    ``norm_eps`` is 1e-5 in VGGT's aggregator and camera trunk and 1e-6 inside DINOv2.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, init_values: float = 0.01, qk_norm: bool = False,
                 rope: Rope2D | None = None, norm_eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        # q/k norm keeps nn.LayerNorm's default eps in both places upstream uses it.
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm, rope=rope)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), pos))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchConv(nn.Module):
    """``proj``: a ``patch × patch`` stride-``patch`` convolution; ``(N, 3, H, W)`` → ``(N, HW/patch², C)``."""

    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoV2(nn.Module):
    """DINOv2 ViT with registers (``dinov2_vitl14_reg`` at paper size) as VGGT builds it.

    Keys: ``cls_token (1,1,C)``, ``pos_embed (1, 1 + (img/patch)², C)``, ``register_tokens
    (1, R, C)``, ``mask_token (1, C)`` (unused, kept for the checkpoint), ``patch_embed.proj``,
    ``blocks.{i}`` (layer scale init 1.0, LayerNorm eps 1e-6, no q/k norm, no RoPE), ``norm``.

    :meth:`forward` maps ImageNet-normalised ``(N, 3, H, W)`` to the final-normed patch tokens
    ``(N, (H/patch)(W/patch), C)``. The position table is resized to other grids by bicubic
    interpolation with antialiasing to the exact grid size (VGGT's settings: antialias on,
    offset 0), skipped when the image is square with the table's patch count.
    """

    def __init__(self, img_size: int, patch_size: int, dim: int, depth: int, num_heads: int, num_registers: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.patch_size, self.num_registers = patch_size, num_registers
        n = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim), requires_grad=False)
        self.patch_embed = _PatchConv(patch_size, dim)
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, init_values=1.0, norm_eps=1e-6) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.register_tokens, std=1e-6)

    def _positions(self, n_patch: int, H: int, W: int) -> torch.Tensor:
        table = self.pos_embed
        n_table = table.shape[1] - 1
        if n_patch == n_table and H == W:
            return table
        side = int(round(n_table ** 0.5))
        grid = table[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(H // self.patch_size, W // self.patch_size), mode="bicubic", antialias=True)
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, table.shape[-1])
        return torch.cat([table[:, :1].float(), grid], 1).to(table.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, _, H, W = x.shape
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(N, -1, -1), t], 1)
        t = t + self._positions(t.shape[1] - 1, H, W)
        t = torch.cat([t[:, :1], self.register_tokens.expand(N, -1, -1), t[:, 1:]], 1)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)[:, 1 + self.num_registers:]
