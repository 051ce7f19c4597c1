"""TRELLIS's structured-latent (SLAT) flow model: a sparse DiT over the occupied voxels.

Upstream: ``trellis/models/structured_latent_flow.py`` (``SLatFlowModel``; official checkpoint
``slat_flow_img_dit_L_64l8p2_fp16``, args in ``configs/generation/slat_flow_img_dit_L_64l8p2_fp16.json``:
resolution 64, 8 channels in/out, 1024 wide, 24 blocks, 16 heads, patch 2 with
``io_block_channels [128]`` and 2 io res blocks, ``pe_mode="ape"``, ``qk_rms_norm=True``).
Training there uses ``ElasticSLatFlowModel`` (a memory-management mixin, same layout and forward),
so both names map to this class.

Forward on :class:`~recon3d.representations.SparseVoxels` at 64^3 (``feats (N, in_channels)``):
``input_layer`` (SparseLinear) lifts to ``io_block_channels[0]``; ``input_blocks`` are
:class:`SparseResBlock3d`\\ s, the last of each stage downsampling by 2 (upstream's pooling; patch 2 -> 32^3)
and widening to ``model_channels``; the sin/cos APE of the 32^3 coordinates is added; the
:class:`ModulatedSparseTransformerCrossBlock`\\ s attend within each object and to its condition
tokens; ``out_blocks`` upsample back through the paired downsample and take the matching input
block's output concatenated on the channels (``use_skip_connection``); a non-affine LayerNorm
(eps 1e-5) and ``out_layer`` give the velocity at the input's voxels, in the input's order.
adaLN projections and ``out_layer`` start at zero: a fresh model predicts velocity 0.

**Parity with upstream**: on the tiny preset with upstream's own (randomised) weights and a
two-object input, the velocity equals upstream's recorded output to 1.1e-6 (output range ±2.2;
``tests/fixtures/trellis/tiny_parity.safetensors``, ``test_forward_matches_upstream_tiny_output``).
The one non-obvious step: upstream's down-sampling divides each coarse cell's sum by ``n + 1``
(its ``scatter_reduce`` counts the zero it starts from), reproduced by
:class:`~recon3d.models.trellis.sparse_blocks.TrellisSparseDownsample`; with the plain mean the
forward differed by 0.57.

State-dict layout (upstream's names)::

    t_embedder.mlp.{0,2}.*                      Linear(256, C), Linear(C, C)
    adaLN_modulation.1.*                        Linear(C, 6C), only with share_mod
    input_layer.*                               SparseLinear(C_in, io[0])
    input_blocks.{j}.{norm1, conv1.conv, conv2.conv, emb_layers.1, skip_connection}.*
    blocks.{i}.norm2.*, .self_attn.{to_qkv, to_out, q_rms_norm, k_rms_norm}, .cross_attn.{to_q, to_kv, to_out},
    blocks.{i}.mlp.mlp.{0,2}.*, .adaLN_modulation.1.*
    out_blocks.{j}.*                            as input_blocks (first: 2C -> io[0], upsample)
    out_layer.*                                 SparseLinear(io[0], C_out)

The APE has no state (computed from the coordinates), as upstream's ``pos_embedder``. Only
``pe_mode="ape"`` is implemented (the released models' mode; upstream's "rope" raises here).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from recon3d.errors import ConfigError, ShapeError
from recon3d.models.sparse import SparseLinear
from recon3d.models.trellis.modules import TimestepEmbedder, absolute_position_embedding
from recon3d.models.trellis.sparse_blocks import (
    ModulatedSparseTransformerCrossBlock,
    SparseResBlock3d,
    convert_sparse_module_to_f16,
    convert_sparse_module_to_f32,
)
from recon3d.representations import SparseVoxels

__all__ = ["SLatFlowModel"]


class SLatFlowModel(nn.Module):
    """Velocity network ``v(x_t, t * 1000, cond)`` on sparse voxel latents (module docstring).

    Args (upstream's names and defaults):
        resolution: grid size of the latent voxels (64).
        in_channels, out_channels: latent channels (8).
        model_channels: transformer width ``C`` (1024).
        cond_channels: width of the condition tokens (1024).
        num_blocks: transformer blocks (24).
        num_heads: heads; default ``model_channels // num_head_channels``.
        mlp_ratio: MLP hidden ratio (4).
        patch_size: total down-sampling of the io blocks, ``2 ** len(io_block_channels)`` (2).
        num_io_res_blocks: res blocks per io stage (2; the last one of a stage changes resolution).
        io_block_channels: widths of the io stages (``[128]``); None: no io blocks (patch 1).
        pe_mode: ``"ape"`` only.
        use_fp16: hold the io and transformer blocks' Linear/conv weights in float16 (upstream's
            torso conversion; embedders, norms, input/out layers stay float32).
        use_checkpoint: activation checkpointing of the transformer blocks.
        use_skip_connection: concatenate the input blocks' outputs in the out blocks.
        share_mod: one adaLN projection for every block (only without io blocks).
        qk_rms_norm, qk_rms_norm_cross: per-head RMS norm on self-/cross-attention queries and keys.
        attn_backend, conv_backend: recon3d's sparse attention / conv backends (not in upstream's json).
    """

    def __init__(self, resolution: int, in_channels: int, model_channels: int, cond_channels: int, out_channels: int,
                 num_blocks: int, num_heads: int | None = None, num_head_channels: int | None = 64, mlp_ratio: float = 4,
                 patch_size: int = 2, num_io_res_blocks: int = 2, io_block_channels: list[int] | None = None,
                 pe_mode: str = "ape", use_fp16: bool = False, use_checkpoint: bool = False, use_skip_connection: bool = True,
                 share_mod: bool = False, qk_rms_norm: bool = False, qk_rms_norm_cross: bool = False,
                 attn_backend: str = "auto", conv_backend: str = "auto"):
        super().__init__()
        if pe_mode != "ape":
            raise ConfigError(f"pe_mode: only 'ape' (the released SLAT flow's) is implemented in recon3d, got {pe_mode!r}")
        if num_heads is None and not num_head_channels:
            raise ConfigError("num_heads / num_head_channels: give one of them")
        self.resolution, self.in_channels, self.out_channels = resolution, in_channels, out_channels
        self.model_channels, self.cond_channels, self.num_blocks = model_channels, cond_channels, num_blocks
        self.num_heads = num_heads or model_channels // num_head_channels
        self.mlp_ratio, self.patch_size, self.num_io_res_blocks = mlp_ratio, patch_size, num_io_res_blocks
        self.io_block_channels = None if io_block_channels is None else list(io_block_channels)
        self.pe_mode, self.use_fp16, self.use_checkpoint = pe_mode, use_fp16, use_checkpoint
        self.use_skip_connection, self.share_mod = use_skip_connection, share_mod
        self.qk_rms_norm, self.qk_rms_norm_cross = qk_rms_norm, qk_rms_norm_cross
        self.dtype = torch.float16 if use_fp16 else torch.float32
        io = self.io_block_channels
        if io is not None:
            stages = math.log2(patch_size) if patch_size >= 1 else -1
            if stages != int(stages) or int(stages) != len(io):
                raise ConfigError(f"patch_size: expected 2 ** len(io_block_channels) = {2 ** len(io)}, got {patch_size}")
            if share_mod:
                # Upstream hands the shared (B, 6C) modulation to the res blocks, whose Linear(C, .)
                # cannot take it: that combination does not run there either.
                raise ConfigError("share_mod: not usable with io_block_channels (upstream feeds the (B, 6C) shared "
                                  "modulation to the io res blocks, which take (B, C))")
            if num_io_res_blocks < 1:
                raise ConfigError(f"num_io_res_blocks: expected >= 1, got {num_io_res_blocks}")

        self.t_embedder = TimestepEmbedder(model_channels)
        if share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 6 * model_channels, bias=True))
        self.input_layer = SparseLinear(in_channels, model_channels if io is None else io[0])

        self.input_blocks = nn.ModuleList()
        self.out_blocks = nn.ModuleList()
        if io is not None:
            for chs, nxt in zip(io, io[1:] + [model_channels]):
                self.input_blocks.extend(SparseResBlock3d(chs, model_channels, chs, conv_backend=conv_backend)
                                         for _ in range(num_io_res_blocks - 1))
                self.input_blocks.append(SparseResBlock3d(chs, model_channels, nxt, downsample=True, conv_backend=conv_backend))
            mult = 2 if use_skip_connection else 1
            for chs, prev in zip(reversed(io), [model_channels] + list(reversed(io[1:]))):
                self.out_blocks.append(SparseResBlock3d(prev * mult, model_channels, chs, upsample=True, conv_backend=conv_backend))
                self.out_blocks.extend(SparseResBlock3d(chs * mult, model_channels, chs, conv_backend=conv_backend)
                                       for _ in range(num_io_res_blocks - 1))

        self.blocks = nn.ModuleList(
            ModulatedSparseTransformerCrossBlock(model_channels, cond_channels, self.num_heads, mlp_ratio,
                                                 use_checkpoint=use_checkpoint, qk_rms_norm=qk_rms_norm,
                                                 qk_rms_norm_cross=qk_rms_norm_cross, share_mod=share_mod, backend=attn_backend)
            for _ in range(num_blocks))
        self.out_layer = SparseLinear(model_channels if io is None else io[0], out_channels)

        self.initialize_weights()
        if use_fp16:
            self.convert_to_fp16()

    def initialize_weights(self) -> None:
        """Upstream's init: xavier-uniform Linear weights, zero biases, N(0, 0.02) time MLP, zero
        adaLN projections and ``out_layer`` (sparse convs keep their own init; ``conv2`` is zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.weight.device.type != "meta":
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.t_embedder.mlp[0].weight.device.type == "meta":
            return
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        mods = [self.adaLN_modulation] if self.share_mod else [b.adaLN_modulation for b in self.blocks]
        for m in mods:
            nn.init.zeros_(m[-1].weight)
            nn.init.zeros_(m[-1].bias)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def convert_to_fp16(self) -> None:
        """Torso (io blocks, transformer blocks) Linear/conv weights to float16, as upstream."""
        for part in (self.input_blocks, self.blocks, self.out_blocks):
            part.apply(convert_sparse_module_to_f16)

    def convert_to_fp32(self) -> None:
        for part in (self.input_blocks, self.blocks, self.out_blocks):
            part.apply(convert_sparse_module_to_f32)

    def forward(self, x: SparseVoxels, t: torch.Tensor, cond: torch.Tensor) -> SparseVoxels:
        """``x`` voxels with ``feats (N, in_channels)`` on the ``resolution^3`` grid, ``t (B,)`` (already
        scaled: ``t * 1000``), ``cond (B, L, cond_channels)`` -> velocity: the same voxels (same coords,
        same row order) with ``feats (N, out_channels)`` in ``x.feats``' dtype."""
        if not isinstance(x, SparseVoxels):
            raise ShapeError(f"x: expected a SparseVoxels, got {type(x).__name__}")
        if x.num_channels != self.in_channels:
            raise ShapeError(f"x.feats: expected {self.in_channels} channels, got {x.num_channels}")
        B = x.batch_size
        if cond.ndim != 3 or cond.shape[0] != B or cond.shape[2] != self.cond_channels:
            raise ShapeError(f"cond: expected (B={B}, L, {self.cond_channels}) condition tokens, got {tuple(cond.shape)}")
        t = torch.as_tensor(t, device=x.feats.device)
        t = t.expand(B) if t.ndim == 0 else t
        if tuple(t.shape) != (B,):
            raise ShapeError(f"t: expected ({B},) times (or a scalar), got {tuple(t.shape)}")
        h = self.input_layer(x)
        h = h.replace(feats=h.feats.to(self.dtype))
        mod = self.t_embedder(t)
        if self.share_mod:
            mod = self.adaLN_modulation(mod)
        mod, cond = mod.to(self.dtype), cond.to(self.dtype)

        skips = []
        for block in self.input_blocks:
            h = block(h, mod)
            skips.append(h.feats)
        # APE of the coarse (32^3 at patch 2) coordinates, added after the down path.
        h = h.replace(feats=h.feats + absolute_position_embedding(h.coords[:, 1:], self.model_channels).to(self.dtype))
        for block in self.blocks:
            h = block(h, mod, cond)
        for block, skip in zip(self.out_blocks, reversed(skips)):
            if self.use_skip_connection:
                h = h.replace(feats=torch.cat([h.feats, skip], dim=1))
            h = block(h, mod)
        h = h.replace(feats=F.layer_norm(h.feats.float(), h.feats.shape[-1:]).to(x.feats.dtype))
        return self.out_layer(h)
