"""Sizes of recon3d's VGGT network (:class:`VGGTConfig`) and its presets.

``"paper"`` is VGGT-1B as released (``facebook/VGGT-1B``): 518-pixel training size, patch 14,
width 1024, DINOv2 ViT-L/14 with 4 registers (24 blocks, 16 heads), 24 frame + 24 global blocks
with 16 heads, camera trunk 4 blocks (16 heads, width 2048), DPT heads with 256 features and
projections [256, 512, 1024, 1024] from aggregator layers [4, 11, 17, 23].
``"tiny"`` is a CPU test size with the same structure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from recon3d.errors import ConfigError

__all__ = ["VGGTConfig", "VGGT_PRESETS", "vggt_config"]


@dataclass(frozen=True)
class VGGTConfig:
    """Every size of the network; see the module docstring for the paper values.

    Attributes:
        img_size: image side the DINOv2 position table was trained at (other multiples of
            ``patch_size`` are interpolated).
        embed_dim: token width C (DINOv2 and aggregator share it); aggregator outputs are 2C.
        depth: number of frame blocks (= number of global blocks = number of outputs).
        dino_depth, dino_heads: DINOv2 patch-embedding size.
        camera_trunk_depth, camera_heads: camera head trunk.
        dpt_features, dpt_out_channels, dpt_layers: DPT heads; ``dpt_layers`` index the
            aggregator outputs.
        dpt_head_hidden: width of the last 3x3 conv before the output 1x1 conv (32 upstream).
        frames_chunk_size: frames per DPT pass (memory; None = all at once).
        max_tokens: budget for frames × tokens per frame in one sample; global attention runs
            over all of them at once and cannot be split by frame, so more is refused with a
            message naming the limit (None = no check).
    """

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    dino_depth: int = 24
    dino_heads: int = 16
    rope_base: float = 100.0
    init_values: float = 0.01
    camera_trunk_depth: int = 4
    camera_heads: int = 16
    camera_iterations: int = 4
    dpt_features: int = 256
    dpt_out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    dpt_layers: tuple[int, int, int, int] = (4, 11, 17, 23)
    dpt_head_hidden: int = 32
    frames_chunk_size: int | None = 8
    max_tokens: int | None = 64 * 1374

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ConfigError(f"img_size: {self.img_size} is not a multiple of patch_size {self.patch_size}")
        for name, heads, width in (("num_heads", self.num_heads, self.embed_dim), ("dino_heads", self.dino_heads, self.embed_dim),
                                   ("camera_heads", self.camera_heads, 2 * self.embed_dim)):
            if width % heads:
                raise ConfigError(f"{name}: {heads} does not divide the width {width}")
        if (self.embed_dim // self.num_heads) % 4:
            raise ConfigError(f"num_heads: head width {self.embed_dim // self.num_heads} must be divisible by 4 for 2-D RoPE")
        if len(self.dpt_layers) != 4 or any(not 0 <= i < self.depth for i in self.dpt_layers):
            raise ConfigError(f"dpt_layers: expected 4 layer indices in [0, {self.depth}), got {list(self.dpt_layers)}")
        if len(self.dpt_out_channels) != 4:
            raise ConfigError(f"dpt_out_channels: expected 4 widths, got {list(self.dpt_out_channels)}")
        if self.frames_chunk_size is not None and self.frames_chunk_size < 1:
            raise ConfigError(f"frames_chunk_size: expected a positive integer or None, got {self.frames_chunk_size}")

    @property
    def patch_start_idx(self) -> int:
        """Index of the first patch token per frame (1 camera + registers before it)."""
        return 1 + self.num_register_tokens


VGGT_PRESETS: dict[str, VGGTConfig] = {
    "paper": VGGTConfig(),
    "tiny": VGGTConfig(
        img_size=28, embed_dim=32, depth=4, num_heads=2, dino_depth=2, dino_heads=2, camera_trunk_depth=2, camera_heads=2,
        dpt_features=16, dpt_out_channels=(8, 16, 32, 32), dpt_layers=(0, 1, 2, 3), frames_chunk_size=2, max_tokens=4096,
    ),
}


def vggt_config(preset: str | VGGTConfig = "paper", **overrides) -> VGGTConfig:
    """A preset by name (or a config) with ``overrides`` applied; unknown names raise :class:`ConfigError`."""
    if isinstance(preset, VGGTConfig):
        base = preset
    elif preset in VGGT_PRESETS:
        base = VGGT_PRESETS[preset]
    else:
        raise ConfigError(f"preset: expected one of {sorted(VGGT_PRESETS)} or a VGGTConfig, got {preset!r}")
    fields = {f.name for f in dataclasses.fields(VGGTConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ConfigError(f"VGGT config: unknown field(s) {bad}; expected some of {sorted(fields)}")
    for k in ("dpt_out_channels", "dpt_layers"):
        if k in overrides:
            overrides[k] = tuple(overrides[k])
    return dataclasses.replace(base, **overrides)
