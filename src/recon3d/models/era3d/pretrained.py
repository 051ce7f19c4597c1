"""Strict import of the released Era3D ``unet`` weights into :class:`~recon3d.models.era3d.unet.Era3DUNet`.

The released UNet (``pengHTYX/MacLab-Era3D-512-6view``, folder ``unet/``: ``config.json`` and
``diffusion_pytorch_model[.fp16].safetensors`` or ``.bin``) is a state dict of upstream's
``UNetMV2DConditionModel``. recon3d's modules carry upstream's names, so the key map
(:func:`official_key_table`) is the identity, but it is **spelled out from the architecture**
(block by block, from the config) rather than read off the network, and the tests compare it with
a manifest generated from upstream's own classes (``scripts/make_era3d_manifest.py``,
``tests/fixtures/era3d/official_manifest.json``): a renamed module in recon3d or a layout change
upstream fails there, not at load time on a GPU machine.

Strict: every network key must be in the file with its shape and every file key must be known;
otherwise one :class:`~recon3d.errors.CheckpointError` line (recon3d's key-mismatch report) names
the file. Tensors are cast to the network's dtype (float32 unless asked). Local files only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from recon3d.errors import CheckpointError, ConfigError
from recon3d.models.era3d.unet import Era3DUNet, Era3DUNetConfig
from recon3d.utils.checkpoint import key_mismatch_report, load_state_dict_file

__all__ = ["WEIGHT_NAMES", "official_key_table", "convert_official_state_dict", "find_weight_file", "load_era3d_unet"]

#: Weight file names looked for in a diffusers model folder, in order.
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.fp16.bin")
WHERE = "https://huggingface.co/pengHTYX/MacLab-Era3D-512-6view (or -ortho)"

_WB = ("weight", "bias")


def _resnet(prefix: str, cin: int, cout: int) -> list[str]:
    keys = [f"{prefix}.{m}.{p}" for m in ("norm1", "conv1", "time_emb_proj", "norm2", "conv2") for p in _WB]
    return keys + ([f"{prefix}.conv_shortcut.{p}" for p in _WB] if cin != cout else [])  # 1x1 only where the width changes


def _transformer(prefix: str, cfg: Era3DUNetConfig) -> list[str]:
    b = f"{prefix}.transformer_blocks.0"
    attn = lambda name: [f"{b}.{name}.to_{x}.weight" for x in "qkv"] + [f"{b}.{name}.to_out.0.{p}" for p in _WB]  # noqa: E731
    keys = [f"{prefix}.norm.{p}" for p in _WB] + [f"{prefix}.proj_in.{p}" for p in _WB] + [f"{prefix}.proj_out.{p}" for p in _WB]
    keys += [f"{b}.norm1.{p}" for p in _WB] + attn("attn1")
    if cfg.multiview_attention:
        keys += [f"{b}.norm_mv.{p}" for p in _WB] + attn("attn_mv")
    keys += [f"{b}.norm2.{p}" for p in _WB] + attn("attn2") + [f"{b}.norm3.{p}" for p in _WB]
    return keys + [f"{b}.ff.net.0.proj.{p}" for p in _WB] + [f"{b}.ff.net.2.{p}" for p in _WB]


def _regressor(prefix: str, blocks: int) -> list[str]:
    keys = [f"{prefix}.linear_in.0.{p}" for p in _WB] + [f"{prefix}.linear_out.{p}" for p in _WB]
    return keys + [f"{prefix}.blocks.{i}.{m}.{p}" for i in range(blocks) for m in ("linear1", "linear2") for p in _WB]


def official_key_table(cfg: Era3DUNetConfig) -> dict[str, str]:
    """``{official_key: recon3d_key}`` of the UNet with config ``cfg`` (identity names, enumerated by level)."""
    ch, n, layers = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
    keys = [f"conv_in.{p}" for p in _WB] + [f"conv_norm_out.{p}" for p in _WB] + [f"conv_out.{p}" for p in _WB]
    keys += [f"{e}.linear_{i}.{p}" for e in ("time_embedding", "class_embedding") for i in (1, 2) for p in _WB]
    cin = ch[0]
    for i, c in enumerate(ch):
        for j in range(layers):
            keys += _resnet(f"down_blocks.{i}.resnets.{j}", cin if j == 0 else c, c)
            if i < n - 1:
                keys += _transformer(f"down_blocks.{i}.attentions.{j}", cfg)
        if i < n - 1:
            keys += [f"down_blocks.{i}.downsamplers.0.conv.{p}" for p in _WB]
        cin = c
    keys += _resnet("mid_block.resnets.0", ch[-1], ch[-1]) + _resnet("mid_block.resnets.1", ch[-1], ch[-1])
    keys += _transformer("mid_block.attentions.0", cfg)
    rev = list(reversed(ch))
    prev = rev[0]
    for i, c in enumerate(rev):
        skip_in = rev[min(i + 1, n - 1)]
        for j in range(layers + 1):
            r_in = (prev if j == 0 else c) + (skip_in if j == layers else c)
            keys += _resnet(f"up_blocks.{i}.resnets.{j}", r_in, c)
            if i > 0:
                keys += _transformer(f"up_blocks.{i}.attentions.{j}", cfg)
        if i < n - 1:
            keys += [f"up_blocks.{i}.upsamplers.0.conv.{p}" for p in _WB]
        prev = c
    if cfg.regress_elevation or cfg.regress_focal_length:
        keys += [f"camera_embedding.linear_{i}.{p}" for i in (1, 2) for p in _WB]
    if cfg.regress_elevation:
        keys += _regressor("elevation_regressor", cfg.num_regress_blocks)
    if cfg.regress_focal_length:
        keys += _regressor("focal_regressor", cfg.num_regress_blocks)
    return {k: k for k in keys}


def convert_official_state_dict(state: Mapping[str, torch.Tensor], unet: Era3DUNet, source: str = "Era3D unet weights",
                                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Map an official UNet state dict (fp16 or fp32) to ``unet``'s names, cast to ``dtype``; strict (module docstring)."""
    table = official_key_table(unet.config)
    ours = unet.state_dict()
    uncovered = sorted(set(ours) - set(table.values()))
    if uncovered:  # the table is incomplete for this config: a recon3d bug, not the file's
        raise CheckpointError(f"{source}: recon3d's Era3D key table misses {len(uncovered)} network entries (e.g. {uncovered[:3]})")
    unexpected, shapes, out = [], [], {}
    for key, value in state.items():
        if key not in table:
            unexpected.append(key)
            continue
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            what = f"{value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"{source}: key {key!r} holds a {what}, expected a floating-point tensor")
        target = table[key]
        if tuple(value.shape) != tuple(ours[target].shape):
            shapes.append(f"{key} {tuple(value.shape)} vs {tuple(ours[target].shape)}")
            continue
        out[target] = value.to(dtype)
    missing = sorted(set(table) - set(state))
    report = key_mismatch_report(missing, unexpected, shapes, len(table), len(table) - len(missing))
    if report:
        raise CheckpointError(f"{source} do not match Era3DUNet({_describe(unet.config)}): {report}")
    return out


def _describe(cfg: Era3DUNetConfig) -> str:
    return (f"blocks={list(cfg.block_out_channels)}, views={cfg.num_views}, "
            f"regressors={'yes' if cfg.regress_elevation or cfg.regress_focal_length else 'no'}")


def find_weight_file(folder: Path) -> Path:
    """The first of :data:`WEIGHT_NAMES` present in ``folder``; CheckpointError naming what to fetch otherwise."""
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no weight file ({' / '.join(WEIGHT_NAMES[:2])}): download the model folder from {WHERE}")


def load_era3d_unet(folder: str | Path, dtype: torch.dtype = torch.float32, map_location: str | torch.device = "cpu") -> Era3DUNet:
    """Build :class:`Era3DUNet` from a local ``unet/`` folder (``config.json`` + weights) and load it strictly.

    Args:
        folder: the released model's ``unet`` folder (or the model folder holding ``unet/``).
        dtype: parameter dtype (the release is fp16; float32 default for CPU numerics).
    """
    folder = Path(folder).expanduser()
    if (folder / "unet" / "config.json").is_file():
        folder = folder / "unet"
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: not found: download the model folder from {WHERE} and give the local path of its unet/")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file}: not a readable JSON config ({e})") from None
    try:
        cfg = Era3DUNetConfig.from_diffusers_config(raw, source=str(config_file))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    weights = find_weight_file(folder)
    with torch.device("meta"):
        unet = Era3DUNet(cfg)
    state = convert_official_state_dict(load_state_dict_file(weights), unet, source=f"Era3D unet weights {str(weights)!r}", dtype=dtype)
    unet.load_state_dict(state, strict=True, assign=True)
    return unet.to(map_location)
