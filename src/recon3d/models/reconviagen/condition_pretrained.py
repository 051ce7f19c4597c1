"""Official ReconViaGen condition-net weights: build recon3d's classes from upstream's names and load.

Upstream (GAP-LAB-CUHK-SZ/ReconViaGen) stores the two condition nets in two ways:

* inference (``Stable-X/trellis-vggt-v0-2``, loaded through its ``pipeline.json`` as TRELLIS does):
  ``ckpts/<name>.json`` = ``{"name": "ModulatedMultiViewCond" | "ModulatedSLATMultiViewCond", "args": {...}}``
  beside ``ckpts/<name>.safetensors`` (model names ``sparse_structure_vggt_cond`` / ``slat_vggt_cond``);
  the json values are not readable from here (unverified), so any upstream constructor argument is accepted;
* training (``train_ss.py`` / ``train_slat.py``): a Lightning ``.ckpt`` whose ``state_dict`` holds
  the net under the prefix ``ss_cond.`` / ``slat_cond.`` beside the flow's ``ss_flow_model.`` /
  ``slat_flow_model.`` (LoRA) keys, built with fixed arguments (:data:`OFFICIAL_CONDITION_ARGS`).

Upstream hard-codes the VGGT width in its forward (``reshape(b, -1, 2048)``), so ``ctx_channels``
maps to ``vggt_channels = 2048`` plus ``dino_channels = ctx_channels - 2048`` (GGC) or
``ctx_channels - channels`` (PVC, whose second input is the running condition). Loading is
strict and all-or-nothing (:func:`~recon3d.models.trellis.pretrained.convert_trellis_state_dict`);
paths are local, nothing is downloaded. Upstream itself loads with ``strict=False``; recon3d does not.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

from recon3d.errors import CheckpointError, ConfigError
from recon3d.models.reconviagen.conditions import GlobalGeometryCondition, LinearPerViewCondition
from recon3d.models.trellis.pretrained import convert_trellis_state_dict, read_trellis_json
from recon3d.utils.checkpoint import extract_state_dict, load_state_dict_file

__all__ = ["CONDITION_CLASSES", "OFFICIAL_CONDITION_ARGS", "build_condition_net", "load_condition_net"]

#: Upstream class name -> recon3d class.
CONDITION_CLASSES: dict[str, type[nn.Module]] = {
    "ModulatedMultiViewCond": GlobalGeometryCondition,
    "ModulatedSLATMultiViewCond": LinearPerViewCondition,
}
#: The arguments upstream's training scripts build the nets with (train_ss.py:300, train_slat.py:290).
OFFICIAL_CONDITION_ARGS: dict[str, dict] = {
    "ModulatedMultiViewCond": {"channels": 1024, "ctx_channels": 3072, "num_heads": 16, "mlp_ratio": 4.0,
                               "attn_mode": "full", "use_checkpoint": False, "use_rope": False, "share_mod": False,
                               "qk_rms_norm": True, "qk_rms_norm_cross": False},
    "ModulatedSLATMultiViewCond": {"channels": 1024, "ctx_channels": 3072},
}
#: Lightning-checkpoint prefixes of the training scripts.
OFFICIAL_PREFIXES = {"ModulatedMultiViewCond": "ss_cond.", "ModulatedSLATMultiViewCond": "slat_cond."}
_ALIASES = {"ggc": "ModulatedMultiViewCond", "pvc": "ModulatedSLATMultiViewCond"}
_VGGT_WIDTH = 2048  # upstream's forward reshapes the VGGT tokens to this width


def _canonical(name: object, source: str) -> str:
    name = _ALIASES.get(name, name) if isinstance(name, str) else name
    if name not in CONDITION_CLASSES:
        raise ConfigError(f"{source}: unknown ReconViaGen condition net {name!r}; expected one of "
                          f"{sorted(CONDITION_CLASSES)} (or 'ggc' / 'pvc')")
    return name


def build_condition_net(name: str, args: dict | None = None, source: str = "ReconViaGen condition config",
                        use_fp16: bool | None = False) -> nn.Module:
    """recon3d's condition net for upstream class ``name`` (or ``"ggc"``/``"pvc"``) with upstream's
    constructor ``args`` (default :data:`OFFICIAL_CONDITION_ARGS`). ``use_fp16``: False/True
    overrides the args' value, None keeps it. Bad args are one :class:`ConfigError` naming ``source``."""
    name = _canonical(name, source)
    a = copy.deepcopy(OFFICIAL_CONDITION_ARGS[name] if args is None else args)
    if not isinstance(a, dict):
        raise ConfigError(f"{source}: 'args' must be an object of constructor arguments, got {type(a).__name__}")
    fp16 = bool(a.pop("use_fp16", False)) if use_fp16 is None else bool(use_fp16)
    a.pop("use_fp16", None)
    a.pop("dtype", None)  # upstream's float32 default; fp16 is the switch above
    try:
        channels, ctx = int(a.pop("channels")), int(a.pop("ctx_channels"))
    except KeyError as e:
        raise ConfigError(f"{source}: 'args' of {name} lacks {e.args[0]!r}") from None
    if name == "ModulatedSLATMultiViewCond":
        if a:
            raise ConfigError(f"{source}: unexpected args for {name}: {sorted(a)}")
        if ctx != _VGGT_WIDTH + channels:
            raise ConfigError(f"{source}: ctx_channels {ctx} must be {_VGGT_WIDTH} (VGGT) + channels {channels}")
        return LinearPerViewCondition(channels=channels, vggt_channels=_VGGT_WIDTH, use_fp16=fp16)
    # GGC: refuse options upstream accepts but its block ignores or cannot run
    for key, ok in (("attn_mode", "full"), ("use_rope", False), ("share_mod", False), ("window_size", None), ("shift_window", None)):
        if a.pop(key, ok) != ok:
            raise ConfigError(f"{source}: {name} arg {key!r} other than {ok!r} is not supported")
    if ctx < _VGGT_WIDTH:
        raise ConfigError(f"{source}: ctx_channels {ctx} must be at least the VGGT width {_VGGT_WIDTH}")
    kw = {"channels": channels, "vggt_channels": _VGGT_WIDTH, "dino_channels": ctx - _VGGT_WIDTH,
          "num_tokens": int(a.pop("num_init_tokens", 4096)), "use_fp16": fp16}
    for key in ("num_heads", "mlp_ratio", "qk_rms_norm", "qk_rms_norm_cross", "use_checkpoint"):
        if key in a:
            kw[key] = a.pop(key)
    if a.pop("qkv_bias", True) is not True:
        raise ConfigError(f"{source}: {name} arg 'qkv_bias' other than True is not supported (upstream's block ignores it)")
    if a:
        raise ConfigError(f"{source}: unexpected args for {name}: {sorted(a)}")
    return GlobalGeometryCondition(**kw)


def load_condition_net(path: str | Path, name: str | None = None, args: dict | None = None, prefix: str | None = None,
                       use_fp16: bool | None = False, allow_pickle: bool = False,
                       map_location: str | torch.device = "cpu") -> nn.Module:
    """Build and strictly load an official condition net.

    Args:
        path: ``<name>.json`` (its ``.safetensors`` beside it), or a weight file (``.safetensors``,
            ``.ckpt``/``.pt``: a plain state dict or a Lightning checkpoint).
        name: upstream class or ``"ggc"``/``"pvc"``; required unless ``path`` is a json.
        args: upstream constructor args for a weight file (default :data:`OFFICIAL_CONDITION_ARGS`).
        prefix: key prefix inside the file; default ``"ss_cond."``/``"slat_cond."`` when the file
            holds keys under it (a training checkpoint), else none.
        use_fp16: as :func:`build_condition_net` (default float32). allow_pickle: for ``.ckpt``
            files holding more than tensors (trusted files only).

    Returns the net in eval mode. Raises :class:`ConfigError` / :class:`CheckpointError` (one line).
    """
    path = Path(path).expanduser()
    if path.suffix == ".json":
        name, args = read_trellis_json(path)
        wpath = path.with_suffix(".safetensors")
        if not wpath.is_file():
            raise CheckpointError(f"ReconViaGen condition weights {str(wpath)!r} not found (the .safetensors beside {path.name})")
    else:
        if name is None:
            raise ConfigError(f"name: loading {path.name} needs the condition net's class ('ggc' / 'pvc' or upstream's name)")
        wpath = path
    name = _canonical(name, str(path))
    model = build_condition_net(name, args, source=str(path), use_fp16=use_fp16)
    obj = load_state_dict_file(wpath, allow_pickle=allow_pickle)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{wpath}: expected a dict of tensors or a Lightning checkpoint, got {type(obj).__name__}")
    if prefix is None:
        flat = obj.get("state_dict", obj)
        official = OFFICIAL_PREFIXES[name]
        prefix = official if isinstance(flat, dict) and any(isinstance(k, str) and k.startswith(official) for k in flat) else ""
    try:
        state = extract_state_dict(obj, prefix)
    except CheckpointError as e:
        raise CheckpointError(f"{wpath}: {e}") from None
    state = convert_trellis_state_dict(state, model, source=f"ReconViaGen condition weights {str(wpath)!r}")
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()
