"""LGM's asymmetric multi-view U-Net (Tang et al. 2024, "LGM: Large Multi-View Gaussian Model").

Structure (checked against ``3DTopia/LGM`` @ fe8d12c, ``core/unet.py`` and ``core/models.py``;
written for recon3d, module and attribute names chosen so that ``state_dict()`` keys equal the
official checkpoint's under the ``unet.`` prefix):

- :class:`ResnetBlock`: ``GroupNorm → SiLU → conv3x3 → GroupNorm → SiLU → conv3x3``, plus the
  input (through a 1x1 ``shortcut`` conv when the channel count changes), times ``skip_scale``
  (``√0.5``). Keys ``norm1, conv1, norm2, conv2[, shortcut]``.
- :class:`MVAttention`: ``GroupNorm``, then the tokens of **all views of an object jointly**
  (``[B·V, C, H, W] → [B, V·H·W, C]``), multi-head self-attention (``attn.qkv`` Linear(C, 3C, no
  bias), ``attn.proj`` Linear(C, C)), back to ``[B·V, C, H, W]``, ``(x + input) · skip_scale``.
  The number of views ``V`` is a parameter (upstream hard-codes 4).
- :class:`DownBlock`: ``num_layers`` resnets (each followed by an attention when ``attention``),
  then a stride-2 3x3 conv ``downsample`` (not in the last block). Every resnet/attention output
  and the downsampled tensor are kept as skips.
- :class:`MidBlock`: resnet, attention, resnet (``nets.0``, ``attns.0``, ``nets.1``).
- :class:`UpBlock`: ``num_layers + 1`` resnets, each taking ``cat(x, skip)`` with the most recent
  skip (each optionally followed by an attention), then nearest ×2 + 3x3 conv ``upsample`` (not in
  the last block).
- :class:`LGMUNet`: ``conv_in`` → down blocks → mid → up blocks → ``norm_out`` → SiLU → ``conv_out``.
  There are fewer up blocks than down blocks ("asymmetric"), so the output is smaller than the
  input: stride ``2 ** (len(down) - len(up))`` (LGM big: 256² → 128²).

Tensors are ``[B·V, C, H, W]`` with the ``V`` views of one object consecutive (view-major within
an object), as LGM flattens ``[B, V, C, H, W]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recon3d.errors import ConfigError, ShapeError

__all__ = ["SKIP_SCALE", "ResnetBlock", "MVAttention", "DownBlock", "MidBlock", "UpBlock", "LGMUNet"]

#: Residual scale of every resnet and attention block (``√0.5`` keeps the variance of a sum of two
#: unit-variance branches at one).
SKIP_SCALE = math.sqrt(0.5)


def _group_norm(channels: int, groups: int, eps: float, what: str) -> nn.GroupNorm:
    if channels % groups:
        raise ConfigError(f"{what}: GroupNorm groups={groups} must divide the {channels} channels (set groups to a divisor)")
    return nn.GroupNorm(groups, channels, eps=eps, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block ``(B, Cin, H, W) → (B, Cout, H, W)`` (module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32, eps: float = 1e-5, skip_scale: float = SKIP_SCALE):
        super().__init__()
        self.in_channels, self.out_channels, self.skip_scale = in_channels, out_channels, skip_scale
        self.norm1 = _group_norm(in_channels, groups, eps, "ResnetBlock in_channels")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, groups, eps, "ResnetBlock out_channels")
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A parameter-free identity keeps the official key set (no `shortcut.*` when channels match).
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (h + self.shortcut(x)) * self.skip_scale


class _SelfAttention(nn.Module):
    """Multi-head self-attention over ``(B, N, C)`` tokens with a fused ``qkv`` projection.

    ``qkv``'s output is laid out ``[3, heads, head_dim]`` along its ``3C`` features (q first), the
    layout of the official weights; the softmax scale is ``head_dim ** -0.5``.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"MVAttention: attention_heads={num_heads} must divide the {dim} channels")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # B heads N head_dim
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class MVAttention(nn.Module):
    """Cross-view self-attention ``(B·V, C, H, W) → (B·V, C, H, W)``: every token attends to all
    ``V·H·W`` tokens of its object's views (module docstring).

    Args:
        dim: channels ``C``.
        num_heads: attention heads (LGM: 16).
        num_views: default ``V`` (the forward's ``num_views`` overrides it).
        groups, eps: of the GroupNorm.
        skip_scale: factor on ``attention + input``.
    """

    def __init__(self, dim: int, num_heads: int = 16, num_views: int = 4, groups: int = 32, eps: float = 1e-5,
                 skip_scale: float = SKIP_SCALE):
        super().__init__()
        self.num_views, self.skip_scale = num_views, skip_scale
        self.norm = _group_norm(dim, groups, eps, "MVAttention dim")
        self.attn = _SelfAttention(dim, num_heads)

    def forward(self, x: torch.Tensor, num_views: int | None = None) -> torch.Tensor:
        V = self.num_views if num_views is None else num_views
        BV, C, H, W = x.shape
        if BV % V:
            raise ShapeError(f"x: expected a batch of B*V images with V={V} views, got {BV} images")
        tokens = self.norm(x).reshape(BV // V, V, C, H, W).permute(0, 1, 3, 4, 2).reshape(BV // V, V * H * W, C)
        out = self.attn(tokens).reshape(BV // V, V, H, W, C).permute(0, 1, 4, 2, 3).reshape(BV, C, H, W)
        return (out + x) * self.skip_scale


class DownBlock(nn.Module):
    """``num_layers`` resnets [+ attention each], then an optional stride-2 ``downsample`` conv.

    Forward: ``(x (B·V, Cin, H, W), num_views)`` → ``(y, skips)`` with ``y`` ``(B·V, Cout, H/2, W/2)``
    (or ``H, W`` without downsampling) and ``skips`` every intermediate output, in order.
    """

    def __init__(self, in_channels: int, out_channels: int, num_layers: int = 2, downsample: bool = True,
                 attention: bool = False, attention_heads: int = 16, num_views: int = 4, groups: int = 32,
                 eps: float = 1e-5, skip_scale: float = SKIP_SCALE):
        super().__init__()
        self.nets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, eps, skip_scale) for i in range(num_layers)
        )
        # Empty when attention is off: the official file then has no `attns.*` keys for the block.
        self.attns = nn.ModuleList(
            MVAttention(out_channels, attention_heads, num_views, groups, eps, skip_scale) for _ in range(num_layers if attention else 0)
        )
        self.downsample = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1) if downsample else None

    def forward(self, x: torch.Tensor, num_views: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, net in enumerate(self.nets):
            x = net(x)
            if len(self.attns):
                x = self.attns[i](x, num_views)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """Resnet, attention (when ``attention``), resnet at the bottleneck ``(B·V, C, h, w)``."""

    def __init__(self, channels: int, attention: bool = True, attention_heads: int = 16, num_views: int = 4,
                 groups: int = 32, eps: float = 1e-5, skip_scale: float = SKIP_SCALE):
        super().__init__()
        self.nets = nn.ModuleList(ResnetBlock(channels, channels, groups, eps, skip_scale) for _ in range(2))
        self.attns = nn.ModuleList(
            MVAttention(channels, attention_heads, num_views, groups, eps, skip_scale) for _ in range(1 if attention else 0)
        )

    def forward(self, x: torch.Tensor, num_views: int | None = None) -> torch.Tensor:
        x = self.nets[0](x)
        if len(self.attns):
            x = self.attns[0](x, num_views)
        return self.nets[1](x)


class UpBlock(nn.Module):
    """``len(skip_channels)`` resnets over ``cat(x, skip)`` [+ attention each], then an optional
    nearest ×2 + 3x3 conv ``upsample``.

    Args:
        in_channels: channels of ``x`` entering the block.
        skip_channels: channels of the skips each resnet consumes, in consumption order (the most
            recent skip first).
        out_channels: channels of every resnet's output.

    Forward: ``(x, skips, num_views)``; ``skips`` is the list of the skips this block consumes, in
    the order they were produced (the block pops from its end).
    """

    def __init__(self, in_channels: int, skip_channels: Sequence[int], out_channels: int, upsample: bool = True,
                 attention: bool = False, attention_heads: int = 16, num_views: int = 4, groups: int = 32,
                 eps: float = 1e-5, skip_scale: float = SKIP_SCALE):
        super().__init__()
        self.nets = nn.ModuleList(
            ResnetBlock((in_channels if i == 0 else out_channels) + c, out_channels, groups, eps, skip_scale)
            for i, c in enumerate(skip_channels)
        )
        self.attns = nn.ModuleList(
            MVAttention(out_channels, attention_heads, num_views, groups, eps, skip_scale)
            for _ in range(len(skip_channels) if attention else 0)
        )
        self.upsample = nn.Conv2d(out_channels, out_channels, 3, padding=1) if upsample else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], num_views: int | None = None) -> torch.Tensor:
        skips = list(skips)
        for i, net in enumerate(self.nets):
            x = net(torch.cat([x, skips.pop()], dim=1))
            if len(self.attns):
                x = self.attns[i](x, num_views)
        if self.upsample is not None:
            x = self.upsample(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class LGMUNet(nn.Module):
    """The U-Net ``(B·V, in_channels, H, W) → (B·V, out_channels, H / s, W / s)``, ``s = 2 ** (len(down) - len(up))``.

    Args:
        in_channels, out_channels: 9 and 14 in LGM.
        down_channels, down_attention: per down block (the first block keeps ``conv_in``'s width).
        mid_attention: attention in the mid block.
        up_channels, up_attention: per up block; at most as many up blocks as down blocks.
        layers_per_block: resnets per down block (up blocks have one more).
        attention_heads: heads of every :class:`MVAttention`.
        num_views: default views per object ``V`` of every attention.
        groups, eps: GroupNorm groups (must divide every width; LGM: 32) and epsilon.
        skip_scale: residual scale (LGM: ``√0.5``).

    H and W must be divisible by ``2 ** (len(down_channels) - 1)`` (:attr:`size_divisor`).
    """

    def __init__(
        self,
        in_channels: int = 9,
        out_channels: int = 14,
        down_channels: Sequence[int] = (64, 128, 256, 512, 1024, 1024),
        down_attention: Sequence[bool] = (False, False, False, True, True, True),
        mid_attention: bool = True,
        up_channels: Sequence[int] = (1024, 1024, 512, 256, 128),
        up_attention: Sequence[bool] = (True, True, True, False, False),
        layers_per_block: int = 2,
        attention_heads: int = 16,
        num_views: int = 4,
        groups: int = 32,
        eps: float = 1e-5,
        skip_scale: float = SKIP_SCALE,
    ):
        super().__init__()
        down_channels, up_channels = [int(c) for c in down_channels], [int(c) for c in up_channels]
        if not down_channels or len(down_attention) != len(down_channels):
            raise ConfigError(f"down_attention: expected one flag per down block ({len(down_channels)}), got {len(down_attention)}")
        if not up_channels or len(up_attention) != len(up_channels):
            raise ConfigError(f"up_attention: expected one flag per up block ({len(up_channels)}), got {len(up_attention)}")
        if len(up_channels) > len(down_channels):
            raise ConfigError(f"up_channels: expected at most {len(down_channels)} up blocks (one per down block), got {len(up_channels)}")
        if layers_per_block < 1:
            raise ConfigError(f"layers_per_block: expected >= 1, got {layers_per_block}")
        self.num_views = num_views
        common = dict(attention_heads=attention_heads, num_views=num_views, groups=groups, eps=eps, skip_scale=skip_scale)

        self.conv_in = nn.Conv2d(in_channels, down_channels[0], 3, padding=1)
        skip_ch = [down_channels[0]]  # channels of the skip stack, in the order skips are produced
        blocks, cin = [], down_channels[0]
        for i, cout in enumerate(down_channels):
            last = i == len(down_channels) - 1
            blocks.append(DownBlock(cin, cout, layers_per_block, downsample=not last, attention=bool(down_attention[i]), **common))
            skip_ch += [cout] * (layers_per_block + (0 if last else 1))
            cin = cout
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(cin, attention=bool(mid_attention), **common)

        blocks = []
        for i, cout in enumerate(up_channels):
            n = layers_per_block + 1
            consumed = skip_ch[-n:][::-1]  # popped from the end: most recent first
            skip_ch = skip_ch[:-n]
            blocks.append(UpBlock(cin, consumed, cout, upsample=i != len(up_channels) - 1, attention=bool(up_attention[i]), **common))
            cin = cout
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = _group_norm(cin, groups, eps, "norm_out channels")
        self.conv_out = nn.Conv2d(cin, out_channels, 3, padding=1)

    @property
    def size_divisor(self) -> int:
        """H and W of the input must be multiples of this (``2 ** number of downsamples``)."""
        return 2 ** (len(self.down_blocks) - 1)

    @property
    def output_stride(self) -> int:
        """Input size / output size (``2 ** (len(down) - len(up))``)."""
        return 2 ** (len(self.down_blocks) - len(self.up_blocks))

    def forward(self, x: torch.Tensor, num_views: int | None = None) -> torch.Tensor:
        """``x (B·V, Cin, H, W)`` → ``(B·V, Cout, H / stride, W / stride)``; ``num_views`` overrides the default ``V``."""
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, num_views)
            skips += s
        x = self.mid_block(x, num_views)
        for block in self.up_blocks:
            n = len(block.nets)
            x = block(x, skips[-n:], num_views)
            skips = skips[:-n]
        return self.conv_out(F.silu(self.norm_out(x)))
