"""GTR's triplane generator: learned triplane tokens + all view tokens through joint self-attention.

Shapes: view tokens ``(B, N, D)`` from an :class:`~recon3d.models.encoders.ImageEncoder`; the
learned plane tokens ``(1, 3, D, r, r)``; the output triplane ``(B, 3, C, r*s, r*s)`` in plane
order xy, xz, yz (:mod:`recon3d.render.triplane`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from recon3d.data.cameras import Cameras
from recon3d.errors import ConfigError, ShapeError
from recon3d.models.gtr.lifting import ProjectedFeatureLifting
from recon3d.utils.checks import check_shape

__all__ = ["SelfAttention", "GEGLUFeedForward", "SelfAttentionBlock", "PixelShuffleUpsampler", "DeconvUpsampler", "TriplaneGenerator"]


class SelfAttention(nn.Module):
    """Multi-head self-attention, ``heads x head_dim`` inner width, no q/k/v bias.

    Uses :func:`torch.nn.functional.scaled_dot_product_attention` (scale ``head_dim ** -0.5``),
    which picks flash / memory-efficient kernels where available.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, dim) -> (B, N, dim)``."""
        B, N, _ = x.shape
        q, k, v = (f(x).view(B, N, self.heads, -1).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.dropout(self.to_out(out.transpose(1, 2).reshape(B, N, -1)))


class GEGLUFeedForward(nn.Module):
    """``Linear(dim -> 2*mult*dim)``, split into value and gate, ``value * gelu(gate)``, ``Linear(mult*dim -> dim)``.

    With ``gated=False`` it is the plain ``Linear -> GELU -> Linear`` MLP.
    """

    def __init__(self, dim: int, mult: int = 4, gated: bool = True, dropout: float = 0.0):
        super().__init__()
        inner = int(dim * mult)
        self.gated = gated
        self.proj_in = nn.Linear(dim, inner * 2 if gated else inner)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, dim) -> (B, N, dim)``."""
        if self.gated:
            value, gate = self.proj_in(x).chunk(2, dim=-1)
            h = value * F.gelu(gate)
        else:
            h = F.gelu(self.proj_in(x))
        return self.proj_out(self.dropout(h))


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + ff(LN(x))`` (GEGLU, ×4)."""

    def __init__(self, dim: int, heads: int, head_dim: int, ff_mult: int = 4, gated_ff: bool = True, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, head_dim, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim, ff_mult, gated_ff, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, dim) -> (B, N, dim)``."""
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class PixelShuffleUpsampler(nn.Module):
    """``Conv2d(dim -> C * s^2, 1x1)`` then ``PixelShuffle(s)``: ``(N, dim, r, r) -> (N, C, r*s, r*s)``.

    GTR's upsampler (paper §3.1: "a linear layer followed by a pixelshuffle layer"), which avoids
    the grid artifacts of a transposed convolution.
    """

    def __init__(self, dim: int, out_channels: int, scale: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, out_channels * scale**2, kernel_size=1)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.proj(x))


class DeconvUpsampler(nn.Module):
    """``ConvTranspose2d(dim -> C, kernel=s, stride=s)``: ``(N, dim, r, r) -> (N, C, r*s, r*s)``.

    The LRM-style upsampler, kept for GTR's ablation against :class:`PixelShuffleUpsampler`.
    """

    def __init__(self, dim: int, out_channels: int, scale: int):
        super().__init__()
        self.proj = nn.ConvTranspose2d(dim, out_channels, kernel_size=scale, stride=scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


_UPSAMPLERS = {"pixelshuffle": PixelShuffleUpsampler, "deconv": DeconvUpsampler}


class TriplaneGenerator(nn.Module):
    """Transformer that turns multi-view tokens into a triplane (GTR §3.1, ``GeneratorV3``).

    Learned plane tokens ``(1, 3, width, r, r)`` (``3 r^2`` tokens) are concatenated with all view
    tokens and go through ``num_layers`` :class:`SelfAttentionBlock` s of joint self-attention
    (no cross-attention, no positional embedding on the view tokens: the ray channels carry
    position). The plane tokens are then layer-normed, reshaped to three ``r x r`` maps and
    upsampled by ``upsample_factor`` to ``(B, 3, plane_channels, r*s, r*s)``.

    Paper vs official code: sizes follow both (paper: 24 blocks, width 1024, 16 heads × 64;
    official config ``config_texrefine.yaml``: the same, with ``r=32``, ``s=8``, ``C=40``). The
    released generator also layer-norms the incoming view tokens (``img_token_normalization``,
    not in the paper) — ``token_norm=True`` by default, needed to load the weights. Its plane
    tokens are initialised ``N(0, 1) * width ** -0.5`` (``init_scale=None``).

    Args:
        width: token width ``D`` (the view tokens must have this width).
        num_layers: number of self-attention blocks.
        num_heads: attention heads; ``head_dim`` channels each.
        plane_resolution: ``r``, side of the learned token planes.
        plane_channels: ``C``, channels of the output triplane.
        upsample_factor: ``s``.
        upsampler: ``"pixelshuffle"`` (GTR) or ``"deconv"`` (LRM-style ablation).
        ff_mult: feed-forward expansion; ``gated_ff`` selects GEGLU (GTR) or GELU.
        token_norm: LayerNorm on the incoming view tokens (official GTR).
        gradient_checkpointing: recompute each block in backward (training only).
        init_scale: std of the plane-token init; ``None`` = ``width ** -0.5``.
        lift_tokens: **not in the paper** (default off): add to the learned plane tokens the view
            tokens lifted onto the ``r x r`` planes through the input cameras
            (:class:`~recon3d.models.gtr.lifting.ProjectedFeatureLifting`, ``lift_depth_samples``
            points per cell line), so each plane token starts from the features of the patches
            it projects to instead of learning that correspondence by attention alone. Needs
            ``cameras`` in :meth:`forward`.
        lift_pixels: **not in the paper** (default off): add to the output triplane the input
            pixels (rgb + mask) lifted the same way at the output resolution ``R = r s`` (a
            pixel-aligned skip past the transformer, for colour detail finer than a patch).
            Needs ``cameras`` and ``images``.
        lift_depth_samples: points per cell line for both liftings (default: the plane side).
        lift_aabb: the box the triplane spans (must equal the field's).
        lift_hidden_dim: hidden width of the liftings' line read-out (None: one linear layer).
    """

    def __init__(
        self,
        width: int = 1024,
        num_layers: int = 24,
        num_heads: int = 16,
        head_dim: int = 64,
        plane_resolution: int = 32,
        plane_channels: int = 40,
        upsample_factor: int = 8,
        upsampler: Literal["pixelshuffle", "deconv"] = "pixelshuffle",
        ff_mult: int = 4,
        gated_ff: bool = True,
        token_norm: bool = True,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        init_scale: float | None = None,
        lift_tokens: bool = False,
        lift_pixels: bool = False,
        lift_depth_samples: int | None = None,
        lift_aabb: tuple[float, float] = (-1.0, 1.0),
        lift_hidden_dim: int | None = None,
    ):
        super().__init__()
        if upsampler not in _UPSAMPLERS:
            raise ConfigError(f"upsampler: expected one of {sorted(_UPSAMPLERS)}, got {upsampler!r}")
        self.width, self.plane_resolution, self.plane_channels = int(width), int(plane_resolution), int(plane_channels)
        self.upsample_factor = int(upsample_factor)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        scale = self.width**-0.5 if init_scale is None else float(init_scale)
        self.planes = nn.Parameter(scale * torch.randn(1, 3, self.width, self.plane_resolution, self.plane_resolution))
        self.token_norm = nn.LayerNorm(self.width) if token_norm else nn.Identity()
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(self.width, num_heads, head_dim, ff_mult, gated_ff, dropout) for _ in range(num_layers)
        )
        self.out_norm = nn.LayerNorm(self.width)
        self.upsampler = _UPSAMPLERS[upsampler](self.width, self.plane_channels, self.upsample_factor)
        self.lift_aabb = (float(lift_aabb[0]), float(lift_aabb[1]))
        self.token_lifting = (ProjectedFeatureLifting(self.width, self.width, self.plane_resolution, lift_depth_samples, self.lift_aabb,
                                                      lift_hidden_dim)
                              if lift_tokens else None)
        self.pixel_lifting = (ProjectedFeatureLifting(4, self.plane_channels, self.output_resolution, lift_depth_samples, self.lift_aabb,
                                                      lift_hidden_dim)
                              if lift_pixels else None)

    @property
    def needs_cameras(self) -> bool:
        """Whether :meth:`forward` needs the input cameras (a lifting option is on)."""
        return self.token_lifting is not None or self.pixel_lifting is not None

    @property
    def output_resolution(self) -> int:
        """Side ``R = r * s`` of the output planes."""
        return self.plane_resolution * self.upsample_factor

    def forward(self, tokens: torch.Tensor, cameras: Cameras | None = None, images: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens (B, N, width)`` -> triplane ``(B, 3, plane_channels, R, R)``.

        ``cameras`` (batch ``(B, V)``, size ``W x H``) and ``images`` (``(B, V, 4, H, W)`` rgb +
        mask) are read only by the lifting options; the tokens must then be view-major, ``T`` per
        view on an ``h x w`` patch grid with ``h / w = H / W`` (:class:`~recon3d.models.encoders.ImageEncoder`).
        """
        check_shape(tokens, f"B N {self.width}", "tokens")
        B = tokens.shape[0]
        r, D = self.plane_resolution, self.width
        if self.needs_cameras and cameras is None:
            raise ShapeError("cameras: TriplaneGenerator with lift_tokens/lift_pixels needs the input cameras, got None")
        planes = self.planes.expand(B, -1, -1, -1, -1)
        view_tokens = self.token_norm(tokens).to(planes.dtype)
        if self.token_lifting is not None:
            planes = planes + self.token_lifting(_token_maps(view_tokens, cameras), cameras.resized(*_grid(tokens, cameras)[::-1]))
        planes = planes.permute(0, 1, 3, 4, 2).reshape(B, 3 * r * r, D)
        x = torch.cat([planes, view_tokens], 1)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.out_norm(x[:, : 3 * r * r])
        x = x.reshape(B * 3, r, r, D).permute(0, 3, 1, 2)
        out = self.upsampler(x)
        out = out.reshape(B, 3, *out.shape[1:])
        if self.pixel_lifting is not None:
            if images is None:
                raise ShapeError("images: TriplaneGenerator with lift_pixels needs the input images, got None")
            check_shape(images, "B V 4 H W", "images", {"B": B, "V": cameras.batch_shape[1], "H": cameras.height, "W": cameras.width})
            out = out + self.pixel_lifting(images.to(out.dtype), cameras)
        return out


def _grid(tokens: torch.Tensor, cameras: Cameras) -> tuple[int, int]:
    """``(h, w)`` of each view's patch grid: ``T = N / V`` tokens with ``h / w = H / W``."""
    V = cameras.batch_shape[-1]
    N = tokens.shape[1]
    T = N // V
    h = max(1, round((T * cameras.height / cameras.width) ** 0.5))
    w = T // h
    if N != V * T or h * w != T:
        raise ShapeError(f"tokens: {N} tokens are not {V} views of an h x w patch grid with h/w = {cameras.height}/{cameras.width}")
    return h, w


def _token_maps(tokens: torch.Tensor, cameras: Cameras) -> torch.Tensor:
    """View-major tokens ``(B, V*h*w, D)`` as feature maps ``(B, V, D, h, w)``."""
    h, w = _grid(tokens, cameras)
    B, _, D = tokens.shape
    return tokens.reshape(B, -1, h, w, D).permute(0, 1, 4, 2, 3)
