"""VGGT's aggregator: DINOv2 patch tokens + camera/register tokens through alternating frame-wise
and global attention.

Per frame the token sequence is ``[camera (1), registers (R), patches (P_img)]``, P = 1 + R + P_img.
Frame 0 takes the first variant of ``camera_token (1, 2, 1, C)`` / ``register_token (1, 2, R, C)``,
every other frame the second, which is how the network knows the reference frame whose camera is
the world frame. Block ``i`` is ``frame_blocks[i]`` (attention within each frame: B·S sequences of
P tokens) followed by ``global_blocks[i]`` (attention over all frames: B sequences of S·P tokens);
output ``i`` is ``cat(frame output, global output)`` on channels, ``[B, S, P, 2C]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recon3d.errors import ConfigError, ShapeError
from recon3d.models.vggt.config import VGGTConfig
from recon3d.models.vggt.layers import Block, DinoV2, Rope2D, patch_positions

__all__ = ["Aggregator", "IMAGENET_MEAN", "IMAGENET_STD", "check_images", "resize_to_patch_multiple", "valid_size"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _nearest_multiple(n: int, m: int) -> int:
    return max(m, int(round(n / m)) * m)


def _check_layout(images: torch.Tensor, name: str) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 5 or images.shape[2] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ShapeError(f"{name}: expected a [B, S, 3, H, W] tensor of RGB in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ShapeError(f"{name}: expected a floating-point tensor in [0, 1], got {images.dtype}")


def valid_size(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """The nearest ``(H, W)`` whose sides are positive multiples of ``patch_size``."""
    return _nearest_multiple(height, patch_size), _nearest_multiple(width, patch_size)


def resize_to_patch_multiple(images: torch.Tensor, patch_size: int, name: str = "images") -> torch.Tensor:
    """``[B, S, 3, H, W]`` → ``[B, S, 3, H', W']`` with ``(H', W') =`` :func:`valid_size`; unchanged
    (the same tensor) when already valid. Bilinear with antialiasing: its weights are non-negative
    and sum to 1, so values in [0, 1] stay in [0, 1]. Each side is rounded on its own, so the
    aspect ratio may change slightly; the per-axis FoV the camera head predicts is unaffected."""
    _check_layout(images, name)
    B, S, _, H, W = images.shape
    Hn, Wn = valid_size(H, W, patch_size)
    if (Hn, Wn) == (H, W):
        return images
    flat = F.interpolate(images.reshape(B * S, 3, H, W), size=(Hn, Wn), mode="bilinear", align_corners=False, antialias=True)
    return flat.reshape(B, S, 3, Hn, Wn)


def check_images(images: torch.Tensor, patch_size: int, name: str = "images") -> None:
    """Raise :class:`ShapeError` unless ``images`` is ``[B, S, 3, H, W]`` float with H, W multiples of ``patch_size``."""
    _check_layout(images, name)
    H, W = images.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ShapeError(f"{name}: height and width must be multiples of the patch size {patch_size}, got {H}x{W} "
                         f"(nearest valid size {_nearest_multiple(H, patch_size)}x{_nearest_multiple(W, patch_size)}; resize or crop, "
                         f"or build VGGTNetwork(..., resize=True) to resize with a warning)")


class Aggregator(nn.Module):
    """``[B, S, 3, H, W]`` in [0, 1] → ``depth`` tensors ``[B, S, P, 2C]`` (see module docstring)."""

    def __init__(self, cfg: VGGTConfig):
        super().__init__()
        self.cfg = cfg
        C, R = cfg.embed_dim, cfg.num_register_tokens
        self.patch_embed = DinoV2(cfg.img_size, cfg.patch_size, C, cfg.dino_depth, cfg.dino_heads, R, cfg.mlp_ratio)
        self.rope = Rope2D(cfg.rope_base)
        self.frame_blocks = nn.ModuleList([Block(C, cfg.num_heads, cfg.mlp_ratio, cfg.init_values, qk_norm=True, rope=self.rope)
                                           for _ in range(cfg.depth)])
        self.global_blocks = nn.ModuleList([Block(C, cfg.num_heads, cfg.mlp_ratio, cfg.init_values, qk_norm=True, rope=self.rope)
                                            for _ in range(cfg.depth)])
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, C) * 1e-6)
        self.register_token = nn.Parameter(torch.randn(1, 2, R, C) * 1e-6)
        self.patch_start_idx = cfg.patch_start_idx
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1), persistent=False)

    def tokens_per_frame(self, H: int, W: int) -> int:
        """P for an ``H × W`` image."""
        return self.patch_start_idx + (H // self.cfg.patch_size) * (W // self.cfg.patch_size)

    def check_budget(self, S: int, H: int, W: int) -> None:
        """Raise :class:`ConfigError` when ``S`` frames of ``H × W`` exceed ``cfg.max_tokens`` tokens."""
        limit = self.cfg.max_tokens
        P = self.tokens_per_frame(H, W)
        if limit is not None and S * P > limit:
            raise ConfigError(
                f"images: {S} views x {P} tokens = {S * P} tokens exceed the global-attention budget max_tokens={limit} "
                f"(at most {limit // P} views at {H}x{W}); global attention spans all views at once and cannot be chunked "
                f"by frame: pass fewer views, smaller images, or raise max_tokens if the device has the memory")

    @staticmethod
    def _special(token: torch.Tensor, B: int, S: int) -> torch.Tensor:
        """``(1, 2, X, C)`` → ``(B·S, X, C)``: variant 0 for frame 0, variant 1 for the others."""
        per_frame = torch.cat([token[:, :1], token[:, 1:].expand(1, S - 1, *token.shape[2:])], 1)
        return per_frame.expand(B, -1, -1, -1).reshape(B * S, *token.shape[2:])

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``images [B, S, 3, H, W]`` in [0, 1] → list of ``depth`` tensors ``[B, S, P, 2C]``."""
        check_images(images, self.cfg.patch_size)
        B, S, _, H, W = images.shape
        self.check_budget(S, H, W)
        x = ((images - self._mean) / self._std).reshape(B * S, 3, H, W)
        patches = self.patch_embed(x)  # (B·S, P_img, C)
        C = patches.shape[-1]
        tokens = torch.cat([self._special(self.camera_token, B, S), self._special(self.register_token, B, S), patches], 1)
        P = tokens.shape[1]
        pos = patch_positions(B * S, H // self.cfg.patch_size, W // self.cfg.patch_size, self.patch_start_idx, images.device)
        pos_global = pos.reshape(B, S * P, 2)
        outputs = []
        for frame_blk, global_blk in zip(self.frame_blocks, self.global_blocks):
            tokens = frame_blk(tokens.reshape(B * S, P, C), pos)
            frame_out = tokens.reshape(B, S, P, C)
            tokens = global_blk(tokens.reshape(B, S * P, C), pos_global)
            outputs.append(torch.cat([frame_out, tokens.reshape(B, S, P, C)], -1))
        return outputs
