"""TRELLIS's sparse-structure flow model: a dense DiT over the SS-VAE latent grid.

Upstream: ``trellis/models/sparse_structure_flow.py`` (``SparseStructureFlowModel``; official
checkpoint ``ss_flow_img_dit_L_16l8_fp16``, args in ``configs/generation/ss_flow_img_dit_L_16l8_fp16.json``:
resolution 16, 8 channels in/out, 1024 wide, 24 blocks, 16 heads, patch 1 -> 4,096 tokens,
``pe_mode="ape"``, ``qk_rms_norm=True``, condition = 1024-d DINOv2 tokens).

Forward: the ``(B, C, R, R, R)`` state is patchified into ``(R/p)^3`` tokens (x slowest),
``input_layer`` lifts them to the model width, the fixed sin/cos position embedding ``pos_emb``
(a persistent buffer: it is in the official state dict) is added, ``t_embedder`` embeds the time
(TRELLIS feeds ``t * 1000``), each :class:`ModulatedTransformerCrossBlock` is modulated by it and
cross-attends to the condition, a final non-affine LayerNorm (eps 1e-5) and ``out_layer`` map back,
and the tokens are unpatchified. adaLN projections and ``out_layer`` start at zero, so a fresh
model predicts velocity 0 everywhere.

State-dict layout (upstream's names)::

    pos_emb                                      ((R/p)^3, C) buffer (APE only)
    t_embedder.mlp.{0,2}.*                       Linear(256, C), Linear(C, C)
    adaLN_modulation.1.*                         Linear(C, 6C), only with share_mod
    input_layer.*                                Linear(C_in p^3, C)
    blocks.{i}.norm2.{weight,bias}
    blocks.{i}.self_attn.{to_qkv,to_out}.*, .self_attn.{q,k}_rms_norm.gamma (qk_rms_norm)
    blocks.{i}.cross_attn.{to_q,to_kv,to_out}.*, .cross_attn.{q,k}_rms_norm.gamma (qk_rms_norm_cross)
    blocks.{i}.mlp.mlp.{0,2}.*
    blocks.{i}.adaLN_modulation.1.*              unless share_mod
    out_layer.*                                  Linear(C, C_out p^3)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from recon3d.errors import ConfigError, ShapeError
from recon3d.models.trellis.modules import (
    ModulatedTransformerCrossBlock,
    TimestepEmbedder,
    absolute_position_embedding,
    convert_module_to_f16,
    convert_module_to_f32,
    grid_coordinates,
    patchify,
    unpatchify,
)

__all__ = ["SparseStructureFlowModel"]


class SparseStructureFlowModel(nn.Module):
    """Velocity network ``v(x_t, t * 1000, cond)`` on a dense ``(B, in_channels, R, R, R)`` state.

    Args (upstream's names and defaults):
        resolution: grid size ``R`` of the state (16).
        in_channels, out_channels: state channels (8).
        model_channels: transformer width ``C`` (1024).
        cond_channels: width of the condition tokens (1024).
        num_blocks: transformer blocks (24).
        num_heads: heads (16); default ``model_channels // num_head_channels``.
        num_head_channels: head width used when ``num_heads`` is None (64).
        mlp_ratio: MLP hidden width / ``C`` (4).
        patch_size: voxels per token edge (the released model: 1; upstream's default 2).
        pe_mode: ``"ape"`` only. Upstream's ``"rope"`` registers no ``pos_emb`` yet its forward adds
            it, so no RoPE model can run there; recon3d refuses it instead of guessing.
        use_fp16: keep the blocks' Linear weights and the activations through them in float16
            (as upstream); recon3d's CPU loader builds with False.
        use_checkpoint: gradient checkpointing per block (training memory).
        share_mod: one ``adaLN_modulation`` for the model instead of one per block.
        qk_rms_norm, qk_rms_norm_cross: per-head RMS norm of queries/keys in self / cross attention.
    """

    def __init__(self, resolution: int, in_channels: int, model_channels: int, cond_channels: int, out_channels: int,
                 num_blocks: int, num_heads: int | None = None, num_head_channels: int | None = 64, mlp_ratio: float = 4,
                 patch_size: int = 2, pe_mode: str = "ape", use_fp16: bool = False, use_checkpoint: bool = False,
                 share_mod: bool = False, qk_rms_norm: bool = False, qk_rms_norm_cross: bool = False):
        super().__init__()
        if pe_mode != "ape":
            raise ConfigError(f"pe_mode: recon3d's SparseStructureFlowModel supports 'ape' only (upstream's dense 'rope' "
                              f"path cannot run: it has no pos_emb), got {pe_mode!r}")
        if not isinstance(patch_size, int) or patch_size < 1 or resolution % patch_size:
            raise ConfigError(f"patch_size: expected a positive integer dividing resolution {resolution}, got {patch_size!r}")
        if num_heads is None:
            if not num_head_channels or model_channels % num_head_channels:
                raise ConfigError(f"num_head_channels: expected a divisor of model_channels {model_channels}, got {num_head_channels!r}")
            num_heads = model_channels // num_head_channels
        if model_channels % num_heads:
            raise ConfigError(f"num_heads: expected a divisor of model_channels {model_channels}, got {num_heads!r}")
        self.resolution, self.in_channels, self.model_channels = resolution, in_channels, model_channels
        self.cond_channels, self.out_channels, self.num_blocks = cond_channels, out_channels, num_blocks
        self.num_heads, self.mlp_ratio, self.patch_size, self.pe_mode = num_heads, mlp_ratio, patch_size, pe_mode
        self.use_fp16, self.use_checkpoint, self.share_mod = use_fp16, use_checkpoint, share_mod
        self.qk_rms_norm, self.qk_rms_norm_cross = qk_rms_norm, qk_rms_norm_cross
        self.dtype = torch.float16 if use_fp16 else torch.float32

        self.t_embedder = TimestepEmbedder(model_channels)
        if share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 6 * model_channels, bias=True))
        tokens_per_axis = resolution // patch_size
        # Persistent: upstream's state dict (and so the official file) holds it.
        self.register_buffer("pos_emb", absolute_position_embedding(grid_coordinates(tokens_per_axis), model_channels))
        self.input_layer = nn.Linear(in_channels * patch_size**3, model_channels)
        self.blocks = nn.ModuleList([
            ModulatedTransformerCrossBlock(model_channels, cond_channels, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                           use_checkpoint=use_checkpoint, qk_rms_norm=qk_rms_norm,
                                           qk_rms_norm_cross=qk_rms_norm_cross, share_mod=share_mod)
            for _ in range(num_blocks)
        ])
        self.out_layer = nn.Linear(model_channels, out_channels * patch_size**3)
        self.initialize_weights()
        if use_fp16:
            self.convert_to_fp16()

    def initialize_weights(self) -> None:
        """Upstream's init: Xavier-uniform Linear weights with zero bias, N(0, 0.02) timestep MLP,
        zero adaLN projections and zero ``out_layer`` (velocity 0 at the start)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        mods = [self.adaLN_modulation[-1]] if self.share_mod else [b.adaLN_modulation[-1] for b in self.blocks]
        for lin in mods + [self.out_layer]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def convert_to_fp16(self) -> None:
        self.use_fp16, self.dtype = True, torch.float16
        self.blocks.apply(convert_module_to_f16)

    def convert_to_fp32(self) -> None:
        self.use_fp16, self.dtype = False, torch.float32
        self.blocks.apply(convert_module_to_f32)

    @property
    def num_tokens(self) -> int:
        return (self.resolution // self.patch_size) ** 3

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x (B, in, R, R, R)``, ``t (B,)`` (already scaled: ``t * 1000``), ``cond (B, S, cond_channels)``
        -> velocity ``(B, out, R, R, R)`` in ``x``'s dtype."""
        R, p = self.resolution, self.patch_size
        if x.ndim != 5 or tuple(x.shape[1:]) != (self.in_channels, R, R, R):
            raise ShapeError(f"x: expected (B, {self.in_channels}, {R}, {R}, {R}), got {tuple(x.shape)}")
        B = x.shape[0]
        if cond.ndim != 3 or cond.shape[0] != B or cond.shape[2] != self.cond_channels:
            raise ShapeError(f"cond: expected (B={B}, S, {self.cond_channels}) condition tokens, got {tuple(cond.shape)}")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(B) if t.ndim == 0 else t
        if tuple(t.shape) != (B,):
            raise ShapeError(f"t: expected ({B},) times (or a scalar), got {tuple(t.shape)}")
        h = patchify(x, p).flatten(2).transpose(1, 2)  # (B, L, C_in p^3), token order = grid flattening
        h = self.input_layer(h) + self.pos_emb[None]
        mod = self.t_embedder(t)
        if self.share_mod:
            mod = self.adaLN_modulation(mod)
        mod, h, cond = mod.to(self.dtype), h.to(self.dtype), cond.to(self.dtype)
        for block in self.blocks:
            h = block(h, mod, cond)
        h = F.layer_norm(h.to(x.dtype), h.shape[-1:])
        h = self.out_layer(h)
        n = R // p
        return unpatchify(h.transpose(1, 2).reshape(B, -1, n, n, n), p).contiguous()
