"""Strict import of the released VGGT weights (``facebook/VGGT-1B``: ``model.pt`` or
``model.safetensors`` + ``config.json``) into :class:`~recon3d.models.vggt.network.VGGTNetwork`.

Layout of the official state dict (facebookresearch/vggt, read from the copy ReconViaGen vendors
under ``wheels/vggt``), at paper size::

    aggregator.camera_token (1, 2, 1, 1024), aggregator.register_token (1, 2, 4, 1024)
    aggregator.patch_embed.{cls_token, pos_embed (1, 1370, 1024), register_tokens, mask_token}
    aggregator.patch_embed.patch_embed.proj.{weight (1024, 3, 14, 14), bias}
    aggregator.patch_embed.blocks.{i}.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}
    aggregator.patch_embed.norm
    aggregator.{frame,global}_blocks.{i}.{... as above, + attn.q_norm, attn.k_norm (64,)}
    camera_head.{trunk.{i}.*, token_norm, trunk_norm, empty_pose_tokens (1, 1, 9), embed_pose,
                 poseLN_modulation.1, pose_branch.fc1, pose_branch.fc2}
    {depth,point}_head.{norm, projects.{0..3}, resize_layers.{0,1,3}, scratch.layer{1..4}_rn,
                        scratch.refinenet{1..4}.{out_conv, resConfUnit1 (not 4), resConfUnit2}.conv{1,2},
                        scratch.output_conv1, scratch.output_conv2.{0,2}}
    track_head.*      (skipped by name: recon3d has no track head)

recon3d's modules carry the same names, so :func:`official_key_table` is the identity; it is
spelled out from the config rather than read off the network, and the tests compare it and the
network with a manifest generated from upstream's classes (``scripts/make_vggt_manifest.py``).
Every network key must be in the file with its shape, every file key must be known or under
``track_head.``; otherwise one :class:`~recon3d.errors.CheckpointError` line lists the first
mismatches. Local files only; nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from recon3d.errors import CheckpointError
from recon3d.models.vggt.config import VGGTConfig
from recon3d.models.vggt.network import VGGTNetwork
from recon3d.utils.checkpoint import key_mismatch_report, load_state_dict_file

__all__ = ["IGNORED_PREFIXES", "official_key_table", "convert_official_state_dict", "read_official_checkpoint", "load_official_vggt"]

#: File keys skipped on purpose: the tracking head, which recon3d does not implement.
IGNORED_PREFIXES = ("track_head.",)
_WHERE = "https://huggingface.co/facebook/VGGT-1B (model.pt, or model.safetensors with config.json)"
_WB = ("weight", "bias")


def _wb(prefix: str) -> list[str]:
    return [f"{prefix}.{p}" for p in _WB]


def _block(prefix: str, qk_norm: bool) -> list[str]:
    keys = _wb(f"{prefix}.norm1") + _wb(f"{prefix}.attn.qkv") + _wb(f"{prefix}.attn.proj") + [f"{prefix}.ls1.gamma"]
    keys += _wb(f"{prefix}.norm2") + _wb(f"{prefix}.mlp.fc1") + _wb(f"{prefix}.mlp.fc2") + [f"{prefix}.ls2.gamma"]
    if qk_norm:
        keys += _wb(f"{prefix}.attn.q_norm") + _wb(f"{prefix}.attn.k_norm")
    return keys


def _dpt(prefix: str) -> list[str]:
    keys = _wb(f"{prefix}.norm")
    for i in range(4):
        keys += _wb(f"{prefix}.projects.{i}")
    for i in (0, 1, 3):  # resize_layers.2 is an identity
        keys += _wb(f"{prefix}.resize_layers.{i}")
    keys += [f"{prefix}.scratch.layer{i}_rn.weight" for i in range(1, 5)]  # bias-free
    for i in range(1, 5):
        r = f"{prefix}.scratch.refinenet{i}"
        keys += _wb(f"{r}.out_conv")
        for unit in (("resConfUnit1", "resConfUnit2") if i < 4 else ("resConfUnit2",)):
            keys += _wb(f"{r}.{unit}.conv1") + _wb(f"{r}.{unit}.conv2")
    keys += _wb(f"{prefix}.scratch.output_conv1") + _wb(f"{prefix}.scratch.output_conv2.0") + _wb(f"{prefix}.scratch.output_conv2.2")
    return keys


def official_key_table(cfg: VGGTConfig, heads=("camera", "depth", "point")) -> dict[str, str]:
    """``{official_key: recon3d_key}`` (identity names) for a network of size ``cfg`` with ``heads``."""
    a = "aggregator"
    keys = [f"{a}.camera_token", f"{a}.register_token"]
    pe = f"{a}.patch_embed"
    keys += [f"{pe}.cls_token", f"{pe}.pos_embed", f"{pe}.register_tokens", f"{pe}.mask_token"] + _wb(f"{pe}.patch_embed.proj")
    for i in range(cfg.dino_depth):
        keys += _block(f"{pe}.blocks.{i}", qk_norm=False)
    keys += _wb(f"{pe}.norm")
    for kind in ("frame_blocks", "global_blocks"):
        for i in range(cfg.depth):
            keys += _block(f"{a}.{kind}.{i}", qk_norm=True)
    if "camera" in heads:
        c = "camera_head"
        for i in range(cfg.camera_trunk_depth):
            keys += _block(f"{c}.trunk.{i}", qk_norm=False)
        keys += _wb(f"{c}.token_norm") + _wb(f"{c}.trunk_norm") + [f"{c}.empty_pose_tokens"] + _wb(f"{c}.embed_pose")
        keys += _wb(f"{c}.poseLN_modulation.1") + _wb(f"{c}.pose_branch.fc1") + _wb(f"{c}.pose_branch.fc2")
    for head in ("depth", "point"):
        if head in heads:
            keys += _dpt(f"{head}_head")
    return {k: k for k in keys}


def convert_official_state_dict(state: Mapping[str, torch.Tensor], net: VGGTNetwork, source: str = "VGGT weights") -> dict[str, torch.Tensor]:
    """Map an official state dict (any float dtype) to ``net.state_dict()`` names, as float32 (strict; see module docstring)."""
    table = official_key_table(net.cfg, net.heads)
    ours = net.state_dict()
    uncovered = sorted(set(ours) - set(table.values()))
    if uncovered:  # the table itself misses network entries: a recon3d bug, not the file's
        raise CheckpointError(f"{source}: recon3d's VGGT key table misses {len(uncovered)} network entries (e.g. {uncovered[:3]})")
    unexpected, shapes, out = [], [], {}
    for key, value in state.items():
        if key.startswith(IGNORED_PREFIXES):
            continue
        if key not in table:
            # a file for a network built without some head still holds that head: skip it by name
            if key.split(".")[0] in ("camera_head", "depth_head", "point_head") and key not in ours:
                continue
            unexpected.append(key)
            continue
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            what = f"{value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"{source}: key {key!r} holds a {what}, expected a floating-point tensor")
        target = table[key]
        if tuple(value.shape) != tuple(ours[target].shape):
            shapes.append(f"{key} {tuple(value.shape)} vs {tuple(ours[target].shape)}")
            continue
        out[target] = value.to(torch.float32)
    missing = sorted(set(table) - set(state))
    report = key_mismatch_report(missing, unexpected, shapes, len(table), len(table) - len(missing))
    if report:
        hint = ""
        prefixes = sorted({k.split(".")[0] for k in unexpected})
        if unexpected and not set(prefixes) & {"aggregator", "camera_head", "depth_head", "point_head"}:
            hint = f" (file prefixes {prefixes[:4]}; expected aggregator., camera_head., depth_head., point_head., track_head.)"
        raise CheckpointError(f"{source} do not match VGGTNetwork: {report}{hint}")
    return out


def _check_config_json(path: Path, cfg: VGGTConfig) -> None:
    try:
        conf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(conf, dict):
        raise CheckpointError(f"{path}: expected a JSON object of VGGT arguments, got {type(conf).__name__}")
    want = {"img_size": cfg.img_size, "patch_size": cfg.patch_size, "embed_dim": cfg.embed_dim}
    bad = {k: conf[k] for k in want if k in conf and conf[k] != want[k]}
    if bad:
        raise CheckpointError(f"{path}: VGGT arguments {bad} differ from the network's {({k: want[k] for k in bad})}")


def read_official_checkpoint(path: str | Path, cfg: VGGTConfig | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a local VGGT file (``model.pt`` / ``model.safetensors``) or folder holding one.

    A folder with ``model.safetensors`` must also hold the ``config.json`` the Hugging Face mixin
    writes next to it (its ``img_size``/``patch_size``/``embed_dim`` are checked against ``cfg``).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        for name in ("model.safetensors", "model.pt"):
            if (path / name).is_file():
                if name == "model.safetensors":
                    conf = path / "config.json"
                    if not conf.is_file():
                        raise CheckpointError(f"{path}: has model.safetensors but no config.json (download both from {_WHERE})")
                    if cfg is not None:
                        _check_config_json(conf, cfg)
                path = path / name
                break
        else:
            raise CheckpointError(f"{path}: no model.safetensors or model.pt in this folder (download from {_WHERE})")
    elif not path.is_file():
        raise CheckpointError(f"VGGT weights {str(path)!r} not found: download from {_WHERE} and give the local path")
    state = load_state_dict_file(path)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"VGGT weights {str(path)!r}: expected a flat dict of tensors, got {type(state).__name__}")
    return state


def load_official_vggt(path: str | Path, net: VGGTNetwork | None = None, map_location: str | torch.device = "cpu") -> VGGTNetwork:
    """Load the released VGGT weights from ``path`` (file or folder) into ``net`` (default ``VGGTNetwork("paper")``)."""
    net = VGGTNetwork("paper") if net is None else net
    state = convert_official_state_dict(read_official_checkpoint(path, net.cfg), net, source=f"VGGT weights {str(path)!r}")
    net.load_state_dict(state, strict=True)
    return net.to(map_location)
