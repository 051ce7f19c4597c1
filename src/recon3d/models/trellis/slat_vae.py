"""TRELLIS's structured-latent (SLAT) VAE torso and encoder: sparse transformers over the voxels.

Upstream (microsoft/TRELLIS @ 6b0d647, MIT): ``trellis/models/structured_latent_vae/{base,encoder}.py``.
Released checkpoint ``slat_enc_swin8_B_64l8_fp16`` (args of ``configs/vae/slat_vae_enc_dec_gs_swin8_B_64l8_fp16.json``):
64^3 voxels, 1024 DINOv2 feature channels in, 768 wide, 12 blocks, 12 heads, swin windows of 8,
8 latent channels.

:class:`SparseTransformerBase` (shared by the encoder and the decoders of ``slat_decoders.py``):
``input_layer`` SparseLinear(C_in, C) -> ``+ APE(coords)`` (the sin/cos embedding of the voxel
coordinates, float32, no state) -> ``blocks.{i}`` :class:`SparseTransformerBlock` s. With
``attn_mode="swin"`` block ``i`` attends within the ``window_size^3`` windows of
``coords + shift``, ``shift = window_size // 2`` on odd blocks, 0 on even ones (upstream's
``block_attn_config``); ``"full"`` attends within each object. Upstream's serialized modes
(``shift_window``, ``shift_sequence``, ``shift_order``) and ``pe_mode="rope"`` are not used by any
released checkpoint and raise here.

:class:`SLatEncoder`: torso -> non-affine LayerNorm (eps 1e-5) -> ``out_layer`` SparseLinear(C, 2 L)
-> ``mean, logvar`` (``L`` each); ``z = mean + exp(logvar / 2) * eps`` when sampling.

``use_fp16`` (every released json says true): the blocks' Linear weights in float16, as upstream;
:func:`~recon3d.models.trellis.load_trellis_model` overrides it to float32 by default.

State-dict layout (upstream's names; norms are non-affine, so they have no keys)::

    input_layer.{weight, bias}                        SparseLinear(C_in, C)
    blocks.{i}.attn.{to_qkv, to_out}.{weight, bias}   (+ q_rms_norm.gamma, k_rms_norm.gamma with qk_rms_norm)
    blocks.{i}.mlp.mlp.{0, 2}.{weight, bias}
    out_layer.{weight, bias}                          encoder: SparseLinear(C, 2 L)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from recon3d.errors import ConfigError, ShapeError
from recon3d.models.sparse import SparseLinear
from recon3d.models.trellis.modules import absolute_position_embedding
from recon3d.models.trellis.sparse_blocks import (
    SparseTransformerBlock,
    convert_sparse_module_to_f16,
    convert_sparse_module_to_f32,
)
from recon3d.representations import SparseVoxels

__all__ = ["SparseTransformerBase", "SLatEncoder", "block_attention_config"]


def block_attention_config(num_blocks: int, attn_mode: str, window_size: int | None) -> list[tuple[str, int | None, int]]:
    """``(mode, window_size, shift)`` of each block: ``"swin"`` -> windowed with shift
    ``window_size // 2`` on odd blocks; ``"full"`` -> full attention (upstream's ``block_attn_config``)."""
    if attn_mode == "full":
        return [("full", None, 0)] * num_blocks
    if attn_mode == "swin":
        if not isinstance(window_size, int) or window_size < 1:
            raise ConfigError(f"window_size: attn_mode 'swin' needs an integer window size >= 1, got {window_size!r}")
        return [("windowed", window_size, window_size // 2 * (i % 2)) for i in range(num_blocks)]
    raise ConfigError(f"attn_mode: recon3d implements 'swin' (the released SLAT VAE's) and 'full', got {attn_mode!r} "
                      "(upstream's serialized modes are not used by any released checkpoint)")


class SparseTransformerBase(nn.Module):
    """Input layer + APE + sparse transformer blocks (module docstring), upstream's argument names.

    Args:
        in_channels: per-voxel input channels ``C_in``; model_channels: width ``C``.
        num_blocks: transformer blocks; num_heads (default ``C // num_head_channels``).
        mlp_ratio: MLP hidden ratio. attn_mode: ``"swin"`` or ``"full"``; window_size: swin window.
        pe_mode: ``"ape"`` only. use_fp16: float16 block weights (upstream's torso conversion).
        use_checkpoint: activation checkpointing of the blocks. qk_rms_norm: per-head RMS norm on q, k.
        attn_backend: recon3d's sparse attention backend (not in upstream's json).
    """

    def __init__(self, in_channels: int, model_channels: int, num_blocks: int, num_heads: int | None = None,
                 num_head_channels: int | None = 64, mlp_ratio: float = 4.0, attn_mode: str = "full",
                 window_size: int | None = None, pe_mode: str = "ape", use_fp16: bool = False, use_checkpoint: bool = False,
                 qk_rms_norm: bool = False, attn_backend: str = "auto"):
        super().__init__()
        if pe_mode != "ape":
            raise ConfigError(f"pe_mode: only 'ape' (the released SLAT VAE's) is implemented in recon3d, got {pe_mode!r}")
        if num_heads is None and not num_head_channels:
            raise ConfigError("num_heads / num_head_channels: give one of them")
        self.in_channels, self.model_channels, self.num_blocks = in_channels, model_channels, num_blocks
        self.window_size, self.mlp_ratio, self.attn_mode, self.pe_mode = window_size, mlp_ratio, attn_mode, pe_mode
        self.num_heads = num_heads or model_channels // num_head_channels
        self.use_fp16, self.use_checkpoint, self.qk_rms_norm = use_fp16, use_checkpoint, qk_rms_norm
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.input_layer = SparseLinear(in_channels, model_channels)
        self.blocks = nn.ModuleList(
            SparseTransformerBlock(model_channels, self.num_heads, mlp_ratio, attn_mode=mode, window_size=ws, shift_window=shift,
                                   use_checkpoint=use_checkpoint, qk_rms_norm=qk_rms_norm, backend=attn_backend)
            for mode, ws, shift in block_attention_config(num_blocks, attn_mode, window_size))

    def initialize_weights(self) -> None:
        """Upstream's init: xavier-uniform Linear weights, zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.weight.device.type != "meta":
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def convert_to_fp16(self) -> None:
        self.blocks.apply(convert_sparse_module_to_f16)

    def convert_to_fp32(self) -> None:
        self.blocks.apply(convert_sparse_module_to_f32)

    def _check_input(self, x: SparseVoxels) -> None:
        if not isinstance(x, SparseVoxels):
            raise ShapeError(f"x: expected a SparseVoxels, got {type(x).__name__}")
        if x.num_channels != self.in_channels:
            raise ShapeError(f"x.feats: expected {self.in_channels} channels per voxel, got {x.num_channels}")

    def forward_torso(self, x: SparseVoxels) -> SparseVoxels:
        """``x feats (N, C_in)`` -> ``feats (N, C)`` in the blocks' dtype, same voxels and order."""
        self._check_input(x)
        h = self.input_layer(x)
        h = h.replace(feats=(h.feats + absolute_position_embedding(x.coords[:, 1:], self.model_channels)).to(self.dtype))
        for block in self.blocks:
            h = block(h)
        return h


class SLatEncoder(SparseTransformerBase):
    """Per-voxel features -> SLAT posterior (module docstring); upstream's ``SLatEncoder`` args.

    Args (besides :class:`SparseTransformerBase`'s): resolution (voxel grid, 64), latent_channels
    ``L`` (8). Defaults as upstream: ``attn_mode="swin"``, ``window_size=8``. ``out_layer`` starts
    at zero (a fresh encoder gives mean 0, logvar 0).
    """

    def __init__(self, resolution: int, in_channels: int, model_channels: int, latent_channels: int, num_blocks: int,
                 num_heads: int | None = None, num_head_channels: int | None = 64, mlp_ratio: float = 4,
                 attn_mode: str = "swin", window_size: int = 8, pe_mode: str = "ape", use_fp16: bool = False,
                 use_checkpoint: bool = False, qk_rms_norm: bool = False, attn_backend: str = "auto"):
        super().__init__(in_channels, model_channels, num_blocks, num_heads, num_head_channels, mlp_ratio, attn_mode,
                         window_size, pe_mode, use_fp16, use_checkpoint, qk_rms_norm, attn_backend)
        self.resolution, self.latent_channels = resolution, latent_channels
        self.out_layer = SparseLinear(model_channels, 2 * latent_channels)
        self.initialize_weights()
        if self.out_layer.weight.device.type != "meta":
            nn.init.zeros_(self.out_layer.weight)
            nn.init.zeros_(self.out_layer.bias)
        if use_fp16:
            self.convert_to_fp16()

    def forward(self, x: SparseVoxels, sample_posterior: bool = True, return_raw: bool = False,
                generator: torch.Generator | None = None):
        """``x feats (N, C_in)`` -> ``z`` (the same voxels, ``feats (N, L)``), and with ``return_raw``
        also ``mean, logvar (N, L)``. ``sample_posterior=False`` gives ``z = mean``."""
        h = self.forward_torso(x)
        f = F.layer_norm(h.feats.to(x.feats.dtype), h.feats.shape[-1:])
        mean, logvar = self.out_layer(x.replace(feats=f)).feats.chunk(2, dim=-1)
        if sample_posterior:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        else:
            z = mean
        z = x.replace(feats=z)
        return (z, mean, logvar) if return_raw else z
