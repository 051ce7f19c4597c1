"""Tiny TRELLIS parts shared by the TRELLIS and ReconViaGen method tests (test_trellis.py,
test_trellis_slat.py, test_reconviagen.py): CPU-sized networks with the layout of the released
ones, the synthetic batch they train on, a few optimiser steps, and checkpoint / pipeline-folder
writers. Each builder takes the seed its callers used (None: the global RNG as it stands), so
every test sees the weights it saw before the builders moved here.

Sizes: SS latent ``4 x 4^3`` decoded to an ``8^3`` structure (``R``), flows 32 wide with 2 heads,
DINOv2 16 wide with 4 registers on 28-pixel images (2 x 2 patches).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from recon3d.models.trellis import SLatFlowModel, SparseStructureDecoder, SparseStructureEncoder, SparseStructureFlowModel
from recon3d.models.trellis.conditioning import TrellisImageCondition
from recon3d.models.trellis.slat_decoders import GAUSSIAN_REPRESENTATION_DEFAULTS, SLatGaussianDecoder
from recon3d.models.trellis.slat_vae import SLatEncoder

#: A 1-layer DINOv2 with registers (hidden 16, 2 heads, patch 14, 4 registers).
DINO = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=14, image_size=28,
            num_register_tokens=4)
#: Side of the decoded structure / SLAT grid (TRELLIS: 64).
R = 8


def _seed(seed: int | None) -> None:
    if seed is not None:
        torch.manual_seed(seed)


def tiny_dino(image_size: int = 28, seed: int | None = 0) -> TrellisImageCondition:
    """The DINOv2 condition of :data:`DINO` (tokens ``(B, 1 + 4 + G^2, 16)``)."""
    _seed(seed)
    return TrellisImageCondition(config=DINO, image_size=image_size)


def tiny_ss_encoder(seed: int | None = None) -> SparseStructureEncoder:
    """SS-VAE encoder: ``(B, 1, 8, 8, 8)`` occupancy -> ``(B, 4, 4, 4, 4)`` latents."""
    _seed(seed)
    return SparseStructureEncoder(1, 4, 1, [8, 16], num_res_blocks_middle=1)


def tiny_ss_decoder(seed: int | None = None, out_bias: float | None = None) -> SparseStructureDecoder:
    """SS-VAE decoder: ``(B, 4, 4, 4, 4)`` -> logits ``(B, 1, 8, 8, 8)``; ``out_bias`` fills the
    output conv's bias (0.5: logits mostly > 0, a non-empty structure from any latent)."""
    _seed(seed)
    dec = SparseStructureDecoder(1, 4, 1, [16, 8], num_res_blocks_middle=1)
    if out_bias is not None:
        with torch.no_grad():
            dec.out_layer[-1].bias.fill_(out_bias)
    return dec


def tiny_ss_flow(seed: int | None = None) -> SparseStructureFlowModel:
    """SS flow on the ``4 x 4^3`` latents, condition width 16."""
    _seed(seed)
    return SparseStructureFlowModel(4, 4, 32, 16, 4, num_blocks=1, num_heads=2, mlp_ratio=2, patch_size=1, qk_rms_norm=True)


def tiny_slat_flow(seed: int | None = None) -> SLatFlowModel:
    """SLAT flow on ``R^3`` voxels with 4 latent channels, condition width 16, one io stage."""
    _seed(seed)
    return SLatFlowModel(R, 4, 32, 16, 4, num_blocks=1, num_heads=2, mlp_ratio=2, patch_size=2, num_io_res_blocks=1,
                         io_block_channels=[16], qk_rms_norm=True)


def tiny_slat_encoder(latent: int = 4, seed: int | None = None) -> SLatEncoder:
    """SLAT encoder: 16-wide DINOv2 voxel features -> ``latent`` channels (full attention)."""
    _seed(seed)
    return SLatEncoder(R, 16, 32, latent, num_blocks=1, num_heads=2, mlp_ratio=2, attn_mode="full")


def gs_representation(**over) -> dict:
    """The released Gaussian decoder's ``representation_config`` with ``over`` replacing entries."""
    return {**GAUSSIAN_REPRESENTATION_DEFAULTS, **over}


def randomize_zero_init(net: torch.nn.Module, scale: float = 0.2, seed: int = 3) -> torch.nn.Module:
    """Give the zero-initialised tensors (adaLN, output layers) ``scale * N(0, 1)`` weights: a fresh
    TRELLIS flow predicts velocity 0 whatever the condition, which would hide any difference
    between conditions (and give LoRA nothing to act on). Returns ``net``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not bool(p.any()):
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return net


def synthetic_batch(cache_dir: Path, resolution: int, num_target_views: int, with_geometry: bool = False):
    """The first training batch (2 objects, 2 input views with masks) of 4 synthetic objects at
    ``resolution`` pixels, with meshes and 256 surface points."""
    from recon3d.data.datamodule import ReconDataModule
    from recon3d.data.synthetic import SyntheticDataset

    ds = SyntheticDataset(num_objects=4, views_per_object=4, resolution=resolution, num_surface_points=256, num_sdf_points=32,
                          mesh_resolution=24, cache_dir=str(cache_dir))
    extra = {"with_geometry": True} if with_geometry else {}
    dm = ReconDataModule(ds, num_val_objects=1, num_test_objects=1, num_input_views=2, num_target_views=num_target_views,
                         batch_size=2, **extra)
    dm.prepare_data()
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def train_steps(model, batch, steps: int) -> list[float]:
    """``steps`` optimiser steps of ``model`` on ``batch`` (its own ``configure_optimizers``);
    the losses before each step."""
    opt = model.configure_optimizers()
    model.train()
    losses = []
    for _ in range(steps):
        loss = model.training_losses(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def save_state(module: torch.nn.Module, path: Path) -> Path:
    """``module``'s state dict as a ``.safetensors`` file at ``path``."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


def write_model_files(folder: Path, name: str, net: torch.nn.Module, config: dict) -> Path:
    """An official-style model: ``<name>.json`` (``config``: ``{"name": class, "args": ...}``) and
    ``<name>.safetensors`` (``net``'s weights) in ``folder``. Returns the json."""
    js = folder / f"{name}.json"
    js.write_text(json.dumps(config))
    save_state(net, folder / f"{name}.safetensors")
    return js


def tiny_gs_decoder(num_gaussians: int, latent: int = 4, seed: int | None = None, attn_mode: str = "swin",
                    **representation) -> SLatGaussianDecoder:
    """TRELLIS's Gaussian decoder on ``R^3`` latents (32 wide, one block): ``num_gaussians`` per voxel,
    swin attention in windows of 4 (or ``attn_mode="full"``), the released representation config
    with ``representation`` replacing entries."""
    _seed(seed)
    attn = {"window_size": 4} if attn_mode == "swin" else {"attn_mode": attn_mode}
    return SLatGaussianDecoder(R, 32, latent, 1, num_heads=2, mlp_ratio=2, **attn,
                               representation_config=gs_representation(num_gaussians=num_gaussians, **representation))
