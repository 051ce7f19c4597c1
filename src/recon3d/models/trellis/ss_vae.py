"""TRELLIS's sparse-structure VAE: dense 3-D convolutions between an occupancy grid and a small latent.

Upstream: ``trellis/models/sparse_structure_vae.py`` (classes ``SparseStructureEncoder`` /
``SparseStructureDecoder``, official checkpoints ``ss_enc_conv3d_16l8_fp16`` /
``ss_dec_conv3d_16l8_fp16``; args in ``configs/vae/ss_vae_conv3d_16l8_fp16.json``). At paper scale
a ``(B, 1, 64, 64, 64)`` occupancy grid becomes a ``(B, 8, 16, 16, 16)`` latent through channels
``[32, 128, 512]`` (two stride-2 downsamples), and back (decoder channels ``[512, 128, 32]``).

State-dict layout (upstream's attribute names, reproduced here)::

    input_layer.{weight,bias}                     Conv3d(in, ch[0], 3)
    blocks.{i}.{norm1,norm2,conv1,conv2}.*        ResBlock3d (norm = channel LayerNorm)
    blocks.{i}.skip_connection.*                  only where the width changes (never in the
                                                  released configs: blocks keep their width)
    blocks.{i}.conv.*                             DownsampleBlock3d Conv3d(k2, s2) /
                                                  UpsampleBlock3d Conv3d(3) to 8 * C_out
    middle_block.{j}.*                            ResBlock3d at the latent end
    out_layer.0.{weight,bias}, out_layer.2.*      norm, SiLU, Conv3d(3) (encoder: to 2 * latent)

Decoding to voxels: TRELLIS keeps the voxels whose logit is > 0
(:func:`occupancy_to_voxels`, which returns recon3d's :class:`SparseVoxels`). Training loss as
upstream's ``SparseStructureVaeTrainer``: :func:`ss_vae_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from recon3d.errors import ConfigError, DataError, ShapeError
from recon3d.models.trellis.modules import (
    ChannelLayerNorm32,
    GroupNorm32,
    convert_module_to_f16,
    convert_module_to_f32,
    pixel_shuffle_3d,
    zero_module,
)
from recon3d.representations.voxels import SparseVoxels

__all__ = [
    "ResBlock3d", "DownsampleBlock3d", "UpsampleBlock3d", "SparseStructureEncoder", "SparseStructureDecoder",
    "occupancy_to_voxels", "ss_vae_loss", "SSVAELoss",
]

NORM_TYPES = ("layer", "group")


def norm_layer(norm_type: str, channels: int) -> nn.Module:
    """``"layer"``: channel LayerNorm (the released configs); ``"group"``: GroupNorm(32, C)."""
    if norm_type == "layer":
        return ChannelLayerNorm32(channels)
    if norm_type == "group":
        return GroupNorm32(32, channels)
    raise ConfigError(f"norm_type: expected one of {NORM_TYPES}, got {norm_type!r}")


class ResBlock3d(nn.Module):
    """``x + conv2(SiLU(norm2(conv1(SiLU(norm1(x))))))`` with 3^3 convs; ``conv2`` starts at zero,
    so a fresh block is its skip path (identity, or a 1x1 conv when the width changes)."""

    def __init__(self, channels: int, out_channels: int | None = None, norm_type: str = "layer"):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.norm1 = norm_layer(norm_type, channels)
        self.norm2 = norm_layer(norm_type, self.out_channels)
        self.conv1 = nn.Conv3d(channels, self.out_channels, 3, padding=1)
        self.conv2 = zero_module(nn.Conv3d(self.out_channels, self.out_channels, 3, padding=1))
        self.skip_connection = nn.Conv3d(channels, self.out_channels, 1) if channels != self.out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, X, Y, Z)`` -> ``(B, C_out, X, Y, Z)``."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip_connection(x)


class DownsampleBlock3d(nn.Module):
    """Halve the grid: ``Conv3d(k=2, s=2)`` under ``conv`` (``mode="conv"``, released) or 2^3 average
    pooling without weights (``mode="avgpool"``, same width only)."""

    def __init__(self, in_channels: int, out_channels: int, mode: str = "conv"):
        super().__init__()
        if mode not in ("conv", "avgpool"):
            raise ConfigError(f"DownsampleBlock3d mode: expected 'conv' or 'avgpool', got {mode!r}")
        if mode == "avgpool" and in_channels != out_channels:
            raise ConfigError(f"DownsampleBlock3d avgpool: in_channels {in_channels} must equal out_channels {out_channels}")
        self.in_channels, self.out_channels, self.mode = in_channels, out_channels, mode
        if mode == "conv":
            self.conv = nn.Conv3d(in_channels, out_channels, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if self.mode == "conv" else F.avg_pool3d(x, 2)


class UpsampleBlock3d(nn.Module):
    """Double the grid: ``Conv3d(3)`` to ``8 * C_out`` then :func:`pixel_shuffle_3d` by 2
    (``mode="conv"``, released) or nearest-neighbour repetition (``mode="nearest"``, same width)."""

    def __init__(self, in_channels: int, out_channels: int, mode: str = "conv"):
        super().__init__()
        if mode not in ("conv", "nearest"):
            raise ConfigError(f"UpsampleBlock3d mode: expected 'conv' or 'nearest', got {mode!r}")
        if mode == "nearest" and in_channels != out_channels:
            raise ConfigError(f"UpsampleBlock3d nearest: in_channels {in_channels} must equal out_channels {out_channels}")
        self.in_channels, self.out_channels, self.mode = in_channels, out_channels, mode
        if mode == "conv":
            self.conv = nn.Conv3d(in_channels, out_channels * 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "conv":
            return pixel_shuffle_3d(self.conv(x), 2)
        return F.interpolate(x, scale_factor=2, mode="nearest")


def _check_channels(channels: Sequence[int], num_res_blocks: int, num_res_blocks_middle: int) -> list[int]:
    if not isinstance(channels, (list, tuple)) or not channels or not all(isinstance(c, int) and c > 0 for c in channels):
        raise ConfigError(f"channels: expected a non-empty list of positive integers, got {channels!r}")
    for name, v in (("num_res_blocks", num_res_blocks), ("num_res_blocks_middle", num_res_blocks_middle)):
        if not isinstance(v, int) or v < 0:
            raise ConfigError(f"{name}: expected an integer >= 0, got {v!r}")
    return list(channels)


class _HalfTorso:
    """``use_fp16`` as upstream: the ``blocks`` and ``middle_block`` Linear/Conv weights in float16,
    activations cast to ``self.dtype`` through them; input/output layers and norms float32."""

    def convert_to_fp16(self) -> None:
        self.use_fp16, self.dtype = True, torch.float16
        self.blocks.apply(convert_module_to_f16)
        self.middle_block.apply(convert_module_to_f16)

    def convert_to_fp32(self) -> None:
        self.use_fp16, self.dtype = False, torch.float32
        self.blocks.apply(convert_module_to_f32)
        self.middle_block.apply(convert_module_to_f32)


class SparseStructureEncoder(_HalfTorso, nn.Module):
    """Occupancy ``(B, in_channels, R, R, R)`` -> latent ``(B, latent_channels, R/2^L, ...)`` with
    ``L = len(channels) - 1`` (upstream's class and arguments).

    Args:
        in_channels: input channels (1: occupancy).
        latent_channels: latent channels (8).
        num_res_blocks: ResBlocks per resolution (2).
        channels: widths per resolution, fine to coarse (``[32, 128, 512]``).
        num_res_blocks_middle: ResBlocks after the last downsample (2).
        norm_type: ``"layer"`` (released) or ``"group"``.
        use_fp16: keep the torso in float16 (module :class:`_HalfTorso`); recon3d's CPU loader
            builds with False.
    """

    def __init__(self, in_channels: int, latent_channels: int, num_res_blocks: int, channels: Sequence[int],
                 num_res_blocks_middle: int = 2, norm_type: str = "layer", use_fp16: bool = False):
        super().__init__()
        channels = _check_channels(channels, num_res_blocks, num_res_blocks_middle)
        self.in_channels, self.latent_channels, self.num_res_blocks = in_channels, latent_channels, num_res_blocks
        self.channels, self.num_res_blocks_middle, self.norm_type = channels, num_res_blocks_middle, norm_type
        self.use_fp16, self.dtype = False, torch.float32

        self.input_layer = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for i, ch in enumerate(channels):
            self.blocks.extend(ResBlock3d(ch, ch, norm_type) for _ in range(num_res_blocks))
            if i + 1 < len(channels):
                self.blocks.append(DownsampleBlock3d(ch, channels[i + 1]))
        self.middle_block = nn.Sequential(*[ResBlock3d(channels[-1], channels[-1], norm_type) for _ in range(num_res_blocks_middle)])
        self.out_layer = nn.Sequential(norm_layer(norm_type, channels[-1]), nn.SiLU(),
                                       nn.Conv3d(channels[-1], 2 * latent_channels, 3, padding=1))
        if use_fp16:
            self.convert_to_fp16()

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, in, R, R, R)`` -> ``(mean, logvar)``, each ``(B, latent, R/f, R/f, R/f)``."""
        if x.ndim != 5 or x.shape[1] != self.in_channels or any(s % self.downsample_factor for s in x.shape[2:]):
            raise ShapeError(f"x: expected (B, {self.in_channels}, X, Y, Z) with X, Y, Z divisible by "
                             f"{self.downsample_factor}, got {tuple(x.shape)}")
        h = self.input_layer(x).to(self.dtype)
        for block in self.blocks:
            h = block(h)
        h = self.middle_block(h).to(x.dtype)
        mean, logvar = self.out_layer(h).chunk(2, dim=1)
        return mean, logvar

    def forward(self, x: torch.Tensor, sample_posterior: bool = False, return_raw: bool = False,
                generator: torch.Generator | None = None):
        """Latent ``z`` (the mean, or ``mean + exp(logvar / 2) * eps`` with ``sample_posterior``;
        ``eps`` from ``generator`` when given); with ``return_raw`` ``(z, mean, logvar)``."""
        mean, logvar = self.moments(x)
        if sample_posterior:
            std = torch.exp(0.5 * logvar)
            eps = torch.randn(std.shape, generator=generator, device=std.device, dtype=std.dtype)
            z = mean + std * eps
        else:
            z = mean
        return (z, mean, logvar) if return_raw else z


class SparseStructureDecoder(_HalfTorso, nn.Module):
    """Latent ``(B, latent_channels, r, r, r)`` -> logits ``(B, out_channels, r 2^L, ...)``
    (upstream's class; ``channels`` coarse to fine, e.g. ``[512, 128, 32]``)."""

    def __init__(self, out_channels: int, latent_channels: int, num_res_blocks: int, channels: Sequence[int],
                 num_res_blocks_middle: int = 2, norm_type: str = "layer", use_fp16: bool = False):
        super().__init__()
        channels = _check_channels(channels, num_res_blocks, num_res_blocks_middle)
        self.out_channels, self.latent_channels, self.num_res_blocks = out_channels, latent_channels, num_res_blocks
        self.channels, self.num_res_blocks_middle, self.norm_type = channels, num_res_blocks_middle, norm_type
        self.use_fp16, self.dtype = False, torch.float32

        self.input_layer = nn.Conv3d(latent_channels, channels[0], 3, padding=1)
        self.middle_block = nn.Sequential(*[ResBlock3d(channels[0], channels[0], norm_type) for _ in range(num_res_blocks_middle)])
        self.blocks = nn.ModuleList()
        for i, ch in enumerate(channels):
            self.blocks.extend(ResBlock3d(ch, ch, norm_type) for _ in range(num_res_blocks))
            if i + 1 < len(channels):
                self.blocks.append(UpsampleBlock3d(ch, channels[i + 1]))
        self.out_layer = nn.Sequential(norm_layer(norm_type, channels[-1]), nn.SiLU(),
                                       nn.Conv3d(channels[-1], out_channels, 3, padding=1))
        if use_fp16:
            self.convert_to_fp16()

    @property
    def upsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z (B, latent, r, r, r)`` -> occupancy logits ``(B, out, f r, f r, f r)``."""
        if z.ndim != 5 or z.shape[1] != self.latent_channels:
            raise ShapeError(f"z: expected (B, {self.latent_channels}, X, Y, Z), got {tuple(z.shape)}")
        h = self.input_layer(z).to(self.dtype)
        h = self.middle_block(h)
        for block in self.blocks:
            h = block(h)
        return self.out_layer(h.to(z.dtype))

    def decode_voxels(self, z: torch.Tensor, names: Sequence[str] | None = None) -> SparseVoxels:
        """``z`` -> the occupied voxels (logit > 0) as :class:`SparseVoxels` (:func:`occupancy_to_voxels`)."""
        return occupancy_to_voxels(self(z), names)


def occupancy_to_voxels(logits: torch.Tensor, names: Sequence[str] | None = None, threshold: float = 0.0) -> SparseVoxels:
    """Occupancy logits ``(B, 1, R, R, R)`` -> :class:`SparseVoxels` of the voxels with logit > threshold.

    ``coords`` rows ``(b, x, y, z)`` (x, y, z = the grid axes 2, 3, 4, as TRELLIS's
    ``argwhere(decoder(z) > 0)[:, [0, 2, 3, 4]]``), ``feats (N, 1)`` the logits there. An object
    with no voxel above the threshold raises one :class:`DataError` naming it (``names[b]``, or
    ``object b``): nothing downstream (the SLAT flow) can run on an empty structure.
    """
    if logits.ndim != 5 or logits.shape[1] != 1 or len(set(logits.shape[2:])) != 1:
        raise ShapeError(f"logits: expected (B, 1, R, R, R) occupancy logits, got {tuple(logits.shape)}")
    B, R = logits.shape[0], logits.shape[2]
    if names is not None and len(names) != B:
        raise ShapeError(f"names: expected {B} object names (one per batch entry), got {len(names)}")
    occ = logits[:, 0] > threshold
    counts = occ.flatten(1).sum(1)
    for b in range(B):
        if int(counts[b]) == 0:
            who = names[b] if names is not None else f"object {b}"
            raise DataError(who, f"sparse-structure decode is empty: no voxel of the {R}^3 grid has a logit > {threshold:g} "
                                 f"(max logit {float(logits[b].max()):.3g}); there is no structure to decode further")
    idx = torch.nonzero(occ)  # (N, 4) rows (b, x, y, z), batch-major: SparseVoxels' order
    return SparseVoxels(idx.to(torch.int32), logits[idx[:, 0], 0, idx[:, 1], idx[:, 2], idx[:, 3]][:, None], R, B)


@dataclass
class SSVAELoss:
    """``loss = recon + lambda_kl * kl``; ``recon`` is the dice, BCE or L1 term, ``kl`` the mean KL."""

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor


LOSS_TYPES = ("dice", "bce", "l1")


def ss_vae_loss(logits: torch.Tensor, occupancy: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
                loss_type: str = "dice", lambda_kl: float = 1e-3) -> SSVAELoss:
    """Upstream's ``SparseStructureVaeTrainer.training_losses`` (released config: dice, KL 1e-3).

    * dice: ``1 - (2 sum(p y) + 1) / (sum p + sum y + 1)`` with ``p = sigmoid(logits)``, summed over
      the whole batch (one ratio, not one per object);
    * bce: mean binary cross-entropy on the logits; l1: mean ``|p - y|``;
    * kl: ``0.5 * mean(mean^2 + exp(logvar) - logvar - 1)`` over every latent element.

    ``logits``/``occupancy`` ``(B, 1, R, R, R)``; ``mean``/``logvar`` the encoder's moments.
    """
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")
    if logits.shape != occupancy.shape:
        raise ShapeError(f"occupancy: expected the logits' shape {tuple(logits.shape)}, got {tuple(occupancy.shape)}")
    y = occupancy.float()
    if loss_type == "bce":
        recon = F.binary_cross_entropy_with_logits(logits, y)
    elif loss_type == "l1":
        recon = (torch.sigmoid(logits) - y).abs().mean()
    else:
        p = torch.sigmoid(logits)
        recon = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
    kl = 0.5 * torch.mean(mean.pow(2) + logvar.exp() - logvar - 1)
    return SSVAELoss(recon + lambda_kl * kl, recon, kl)
