"""Import the released LGM weights (``ashawkey/LGM`` ``model_fp16_fixrot.safetensors``) into :class:`LGMNetwork`.

Layout of the official file (``3DTopia/LGM`` @ fe8d12c, ``core/models.py``: ``LGM.state_dict``
drops ``lpips_loss.*``; ``core/unet.py``): float16 tensors, for the ``big`` options::

    unet.conv_in.{weight,bias}                                   (64, 9, 3, 3)
    unet.down_blocks.{i}.nets.{j}.{norm1,conv1,norm2,conv2}.*    j < 2
    unet.down_blocks.{i}.nets.{j}.shortcut.*                     1x1, where the width changes
    unet.down_blocks.{i}.attns.{j}.{norm.*,attn.qkv.weight,attn.proj.*}   blocks with attention
    unet.down_blocks.{i}.downsample.*                            all but the last block
    unet.mid_block.nets.{0,1}.*, unet.mid_block.attns.0.*
    unet.up_blocks.{i}.nets.{j}.* (j < 3, all with a shortcut), .attns.{j}.*, .upsample.*
    unet.norm_out.*, unet.conv_out.*                            (14, 128, 3, 3)
    conv.{weight,bias}                                           (14, 14, 1, 1)

The key names are reproduced by recon3d's modules, so the map (:func:`official_key_table`) is the
identity, but it is spelled out from the architecture rather than read off the network, and the
test compares both with a manifest generated from upstream's own classes
(``scripts/make_lgm_manifest.py``, ``tests/fixtures/lgm/official_manifest.json``).

**Strict, unlike upstream.** ``infer.py`` loads with ``strict=False`` because upstream's ``LGM``
module also holds the LPIPS-VGG loss whose keys the file lacks. That flag also leaves every other
missing key at its random initialisation without a word — a ``small`` network given the ``big``
file, a truncated or renamed file would run as a partly random model. recon3d's network holds no
loss, so nothing needs tolerating: every network key must be in the file with its shape, every
file key must be known, and the only keys skipped are ``lpips_loss.*`` (present in checkpoints
saved without upstream's ``state_dict`` override). A mismatch is one
:class:`~recon3d.errors.CheckpointError` line naming the file, worded by recon3d's key-mismatch
report (:func:`recon3d.utils.checkpoint.key_mismatch_report`). Tensors are cast to float32.

Weights are read from a local path only; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from recon3d.errors import CheckpointError
from recon3d.models.lgm.network import LGMNetwork
from recon3d.models.lgm.unet import ResnetBlock
from recon3d.utils.checkpoint import key_mismatch_report, load_state_dict_file

__all__ = ["OFFICIAL_FILE", "IGNORED_PREFIXES", "official_key_table", "convert_official_state_dict", "read_official_checkpoint",
           "load_official_lgm"]

#: The released file and where it comes from (named in the not-found error).
OFFICIAL_FILE = "model_fp16_fixrot.safetensors"
_WHERE = "https://huggingface.co/ashawkey/LGM (file model_fp16_fixrot.safetensors, the 'big' model)"

#: File keys skipped on purpose: the LPIPS loss of upstream's training module.
IGNORED_PREFIXES = ("lpips_loss.",)

_WB = ("weight", "bias")


def _resnet_keys(prefix: str, block: ResnetBlock) -> list[str]:
    keys = [f"{prefix}.{part}.{p}" for part in ("norm1", "conv1", "norm2", "conv2") for p in _WB]
    if block.in_channels != block.out_channels:  # upstream's 1x1 shortcut exists only then
        keys += [f"{prefix}.shortcut.{p}" for p in _WB]
    return keys


def _attention_keys(prefix: str) -> list[str]:
    # qkv has no bias in LGM (qkv_bias=False); proj has one.
    return [f"{prefix}.norm.weight", f"{prefix}.norm.bias", f"{prefix}.attn.qkv.weight", f"{prefix}.attn.proj.weight",
            f"{prefix}.attn.proj.bias"]


def official_key_table(net: LGMNetwork) -> dict[str, str]:
    """``{official_key: recon3d_key}`` for ``net``'s sizes (identity names, enumerated block by block)."""
    u = net.unet
    official: list[str] = [f"unet.conv_in.{p}" for p in _WB]
    for i, blk in enumerate(u.down_blocks):
        for j, r in enumerate(blk.nets):
            official += _resnet_keys(f"unet.down_blocks.{i}.nets.{j}", r)
        for j in range(len(blk.attns)):
            official += _attention_keys(f"unet.down_blocks.{i}.attns.{j}")
        if blk.downsample is not None:
            official += [f"unet.down_blocks.{i}.downsample.{p}" for p in _WB]
    for j, r in enumerate(u.mid_block.nets):
        official += _resnet_keys(f"unet.mid_block.nets.{j}", r)
    for j in range(len(u.mid_block.attns)):
        official += _attention_keys(f"unet.mid_block.attns.{j}")
    for i, blk in enumerate(u.up_blocks):
        for j, r in enumerate(blk.nets):
            official += _resnet_keys(f"unet.up_blocks.{i}.nets.{j}", r)
        for j in range(len(blk.attns)):
            official += _attention_keys(f"unet.up_blocks.{i}.attns.{j}")
        if blk.upsample is not None:
            official += [f"unet.up_blocks.{i}.upsample.{p}" for p in _WB]
    official += [f"unet.norm_out.{p}" for p in _WB] + [f"unet.conv_out.{p}" for p in _WB] + [f"conv.{p}" for p in _WB]
    return {k: k for k in official}


def convert_official_state_dict(state: Mapping[str, torch.Tensor], net: LGMNetwork, source: str = "LGM weights") -> dict[str, torch.Tensor]:
    """Map an official state dict (any float dtype) to ``net.state_dict()`` names, as float32.

    Strict (module docstring); ``source`` names the file in the error.
    """
    table = official_key_table(net)
    ours = net.state_dict()
    uncovered = sorted(set(ours) - set(table.values()))
    if uncovered:  # the table itself is incomplete for this network: a recon3d bug, not the file's
        raise CheckpointError(f"{source}: recon3d's LGM key table misses {len(uncovered)} network entries (e.g. {uncovered[:3]})")
    missing, unexpected, shapes = [], [], []
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(IGNORED_PREFIXES):
            continue
        if key not in table:
            unexpected.append(key)
            continue
        target = table[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            what = f"{value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"{source}: key {key!r} holds a {what}, expected a floating-point tensor")
        if tuple(value.shape) != tuple(ours[target].shape):
            shapes.append(f"{key} {tuple(value.shape)} vs {tuple(ours[target].shape)}")
            continue
        out[target] = value.to(torch.float32)
    missing = sorted(set(table) - set(state))
    report = key_mismatch_report(missing, unexpected, shapes, len(table), len(table) - len(missing))
    if report:
        raise CheckpointError(f"{source} do not match LGMNetwork(preset={net.preset!r}): {report}")
    return out


def read_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a local ``.safetensors`` (or weights-only ``.pt``/``.pth``) LGM file, on the CPU."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"LGM weights {str(path)!r} not found: download {OFFICIAL_FILE} from {_WHERE} and give its local path")
    state = load_state_dict_file(path)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"LGM weights {str(path)!r}: expected a flat dict of tensors, got {type(state).__name__}")
    return state


def load_official_lgm(path: str | Path, net: LGMNetwork | None = None, map_location: str | torch.device = "cpu") -> LGMNetwork:
    """Load the released LGM weights from the local file ``path`` into ``net`` (default ``LGMNetwork("big")``).

    Returns the network (float32, on ``map_location``). Raises :class:`CheckpointError` naming the
    file when it is absent or does not fit the network exactly.
    """
    net = LGMNetwork("big") if net is None else net
    state = convert_official_state_dict(read_official_checkpoint(path), net, source=f"LGM weights {str(path)!r}")
    net.load_state_dict(state, strict=True)
    return net.to(map_location)
