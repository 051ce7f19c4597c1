"""LoRA adapters over `peft <https://github.com/huggingface/peft>`_: a thin, explicit API for any ``nn.Module``.

peft does the LoRA layers and their math; this module chooses which sub-modules get them, keeps
the base network's ``requires_grad`` flags alone until asked, writes adapter-only safetensors
files with a checked metadata header, and folds the adapters back into a plain network.

The layer, for a wrapped ``nn.Linear`` with weight ``W (out, in)``::

    y = W x + b + (alpha / r) * B (A dropout(x))        A: (r, in)   B: (out, r)

``A`` is Kaiming-uniform initialised and ``B`` is zero, so an adapted network computes exactly
what the base network does until ``B`` is trained. The scaling is ``alpha / r`` (the original
LoRA convention, peft's default; not rsLoRA's ``alpha / sqrt(r)``). For an ``nn.Conv2d`` with
weight ``(out, in, kh, kw)``, ``A`` is a conv ``(r, in, kh, kw)`` with the base layer's stride
and padding and ``B`` a ``1x1`` conv ``(out, r, 1, 1)``; merged, ``W += (alpha / r) *
(B[:, :, 0, 0] @ A.flatten(1)).view_as(W)``. Grouped, dilated and non-zero-padded convs are
refused (peft's adapter conv does not reproduce them).

Typical use (the order matters: :func:`mark_only_lora_as_trainable` after :func:`add_lora`)::

    cfg = LoRAConfig(target_modules=r"blocks\\.\\d+\\.attn\\.to_(q|k|v|out)", r=8, alpha=16)
    add_lora(net, cfg)
    mark_only_lora_as_trainable(net)
    ...train...
    save_lora(net, "adapter.safetensors")
    load_lora(add_lora(fresh_net, read_lora_config("adapter.safetensors")), "adapter.safetensors")
    merge_lora(net)  # plain network again, original state-dict keys

An adapted module's own ``state_dict`` uses peft's keys (``to_q.base_layer.weight``,
``to_q.lora_A.default.weight``); the adapter files use ``to_q.lora_A.weight`` /
``to_q.lora_B.weight`` (and the base layers' own bias keys, e.g. ``to_out.bias``, when biases are
saved), i.e. names relative to the module passed in.

peft is imported on first use (it pulls in ``transformers``, several seconds), so importing
:mod:`recon3d.adapters` stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn as nn

from recon3d.errors import CheckpointError, ConfigError, ShapeError
from recon3d.utils.io import atomic_path

__all__ = [
    "LoRAConfig",
    "LORA_LAYER_TYPES",
    "LoadResult",
    "find_lora_targets",
    "add_lora",
    "lora_layers",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "save_lora",
    "load_lora",
    "read_lora_config",
    "merge_lora",
    "unmerge_lora",
    "set_lora_enabled",
    "lora_disabled",
]

#: Sub-module types LoRA can be added to (what peft wraps and can merge back).
LORA_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)

_ADAPTER = "default"  # one adapter per module; peft's default name, stripped from file keys
_FORMAT = "recon3d-lora"
_FORMAT_VERSION = "1"
_BIAS_MODES = ("none", "lora_only", "all")
_MAX_LISTED = 16  # names listed in a "matches nothing" error


@dataclass
class LoRAConfig:
    """Which sub-modules get LoRA and how big it is (a YAML block maps onto it field by field).

    Args:
        target_modules: a **string** is a regular expression that must match a sub-module's
            full dotted name (``re.fullmatch``, e.g. ``r"blocks\\.\\d+\\.attn\\.to_(q|v)"``); a
            **list** holds module names, each matching a sub-module whose name equals it or ends
            in ``"." + name`` (``["to_q", "to_v"]`` hits every block), and every entry must match
            something. Only :data:`LORA_LAYER_TYPES` sub-modules are candidates.
        r: rank of ``A (r, in)`` and ``B (out, r)``, ``>= 1``.
        alpha: the update is scaled by ``alpha / r``.
        dropout: dropout on the adapter's input (training only; the base path has none).
        exclude: names removed from the matches, with the same string/list rules.
    """

    target_modules: str | list[str]
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    exclude: str | list[str] | None = None

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"lora.r: expected an integer >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"lora.alpha: expected a finite number > 0, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: expected a number in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        self.target_modules = _check_spec(self.target_modules, "lora.target_modules")
        if self.exclude is not None:
            self.exclude = _check_spec(self.exclude, "lora.exclude")

    @property
    def scaling(self) -> float:
        """``alpha / r``, the factor on ``B @ A``."""
        return self.alpha / self.r


def _check_spec(spec: object, name: str) -> str | list[str]:
    if isinstance(spec, str):
        if not spec:
            raise ConfigError(f"{name}: expected a non-empty regular expression or a list of module names, got ''")
        try:
            re.compile(spec)
        except re.error as e:
            raise ConfigError(f"{name}: {spec!r} is not a valid regular expression ({e})") from None
        return spec
    if isinstance(spec, Sequence) and spec and all(isinstance(s, str) and s for s in spec):
        return list(spec)
    raise ConfigError(f"{name}: expected a regular expression string or a non-empty list of module names, got {spec!r}")


def _matches(name: str, spec: str | list[str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _summarise(names: Sequence[str]) -> str:
    """``blocks.0.attn.to_q, blocks.1.attn.to_q`` -> ``blocks.<i>.attn.to_q``: one entry per
    layer kind, so a 24-block transformer lists 6 names, not 144."""
    collapsed = list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "<i>", n) for n in names))
    shown = ", ".join(collapsed[:_MAX_LISTED])
    more = f", ... ({len(collapsed)} kinds)" if len(collapsed) > _MAX_LISTED else ""
    return f"{shown}{more}"


def _candidates(module: nn.Module) -> tuple[list[str], dict[str, str]]:
    """Names of the sub-modules LoRA can wrap, and ``{name: why not}`` for the other sub-modules
    (their type, or the reason a supported type is refused). Existing LoRA layers and their
    insides are neither."""
    wrapped = tuple(f"{n}." for n in lora_layers(module))
    ok, refused = [], {}
    for name, sub in module.named_modules():
        if not name or _is_lora_layer(sub) or (wrapped and (name + ".").startswith(wrapped)):
            continue
        if isinstance(sub, nn.Conv2d) and sub.groups > 1:
            refused[name] = f"Conv2d with groups={sub.groups}, which peft cannot merge"
        elif isinstance(sub, nn.Conv2d) and (tuple(sub.dilation) != (1, 1) or sub.padding_mode != "zeros"):
            # peft's adapter conv copies kernel, stride and padding only: it would not see these.
            refused[name] = f"Conv2d with dilation={tuple(sub.dilation)}, padding_mode={sub.padding_mode!r}"
        elif isinstance(sub, LORA_LAYER_TYPES):
            ok.append(name)
        else:
            refused[name] = type(sub).__name__
    return ok, refused


def _unsupported_hint(refused: dict[str, str], spec: str | list[str]) -> str:
    wrong = [f"{n} ({why})" for n, why in refused.items() if _matches(n, spec)]
    return f" (it matches only modules LoRA cannot wrap: {', '.join(wrong[:4])}{', ...' if len(wrong) > 4 else ''})" if wrong else ""


def find_lora_targets(module: nn.Module, target_modules: str | Sequence[str], exclude: str | Sequence[str] | None = None) -> list[str]:
    """Full dotted names of the sub-modules of ``module`` that ``target_modules`` selects.

    Matching rules are :class:`LoRAConfig`'s. Raises a one-line :class:`ConfigError` that lists
    the ``nn.Linear`` / ``nn.Conv2d`` names that exist when the pattern (or one list entry) matches
    none of them, or names the matched modules of another type.
    """
    target_modules = _check_spec(target_modules, "target_modules")
    exclude = None if exclude is None else _check_spec(exclude, "exclude")
    ok, refused = _candidates(module)
    owner = type(module).__name__
    kinds = "/".join(f"nn.{t.__name__}" for t in LORA_LAYER_TYPES)
    if not ok:
        raise ConfigError(f"target_modules: {owner} has no {kinds} sub-module to add LoRA to")
    if isinstance(target_modules, list):
        for entry in target_modules:
            if not any(_matches(n, [entry]) for n in ok):
                raise ConfigError(
                    f"target_modules: entry {entry!r} matches no {kinds} sub-module of {owner}"
                    f"{_unsupported_hint(refused, [entry])}; those that exist: {_summarise(ok)}"
                )
    hits = [n for n in ok if _matches(n, target_modules)]
    if not hits:
        raise ConfigError(
            f"target_modules: {target_modules!r} matches no {kinds} sub-module of {owner}"
            f"{_unsupported_hint(refused, target_modules)}; those that exist: {_summarise(ok)}"
        )
    if exclude is not None:
        hits = [n for n in hits if not _matches(n, exclude)]
        if not hits:
            raise ConfigError(f"exclude: {exclude!r} removes every module that target_modules {target_modules!r} matched")
    return hits


# --------------------------------------------------------------------------------------------
# peft layers


def _lora_layer_type():
    """peft's ``LoraLayer`` class, or ``None`` when peft was never imported (then no module can
    hold one, and the import's seconds are not spent just to find that out)."""
    if "peft" not in sys.modules:
        return None
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def _is_lora_layer(module: nn.Module) -> bool:
    cls = _lora_layer_type()
    return cls is not None and isinstance(module, cls)


def lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    """``{full name: peft LoRA layer}`` for every LoRA-wrapped sub-module, in module order."""
    if _lora_layer_type() is None:
        return {}
    return {n: m for n, m in module.named_modules() if _is_lora_layer(m)}


def _require_layers(module: nn.Module, what: str) -> dict[str, nn.Module]:
    layers = lora_layers(module)
    if not layers:
        raise ConfigError(f"{what}: {type(module).__name__} has no LoRA layers (call add_lora first)")
    return layers


def _adapter_params(module: nn.Module) -> list[nn.Parameter]:
    out = []
    for layer in lora_layers(module).values():
        for attr in layer.adapter_layer_names:
            for sub in getattr(layer, attr).values():
                out.extend(sub.parameters())
    return out


def _as_config(config: LoRAConfig | Mapping | None, overrides: dict) -> LoRAConfig:
    known = {f.name for f in fields(LoRAConfig)}
    if config is None:
        given = dict(overrides)
    elif isinstance(config, Mapping):
        given = {**config, **overrides}
    elif isinstance(config, LoRAConfig):
        given = {**{k: getattr(config, k) for k in known}, **overrides}
    else:
        raise ConfigError(f"lora: expected a LoRAConfig or a mapping of its fields, got {type(config).__name__}")
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"lora: unknown key(s) {unknown}; expected some of {sorted(known)}")
    if "target_modules" not in given:
        raise ConfigError("lora.target_modules: missing (a regular expression or a list of module names)")
    return LoRAConfig(**given)


def add_lora(module: nn.Module, config: LoRAConfig | Mapping | None = None, /, **fields_) -> nn.Module:
    """Wrap the sub-modules ``config.target_modules`` selects in peft LoRA layers, in place.

    Args:
        module: any ``nn.Module``; it is modified and returned.
        config: a :class:`LoRAConfig` or a mapping of its fields (a parsed YAML block);
            keyword ``fields_`` override it or, without ``config``, make it
            (``add_lora(net, target_modules=["to_q"], r=4)``).

    The base network's ``requires_grad`` flags are left as they were (peft freezes everything
    but the adapters; that is :func:`mark_only_lora_as_trainable`'s job here, so adding LoRA and
    choosing what trains stay two explicit steps). The adapters get the dtype and device of the
    layer they wrap. A module that already has LoRA layers is refused: one adapter per module.
    """
    config = _as_config(config, fields_)
    if lora_layers(module):
        raise ConfigError(f"add_lora: {type(module).__name__} already has LoRA layers ({_summarise(list(lora_layers(module)))}); merge_lora it or start from a fresh module")
    targets = find_lora_targets(module, config.target_modules, config.exclude)

    from peft import LoraConfig, inject_adapter_in_model

    flags = {id(p): p.requires_grad for p in module.parameters()}
    # Hand peft the resolved names as one anchored alternation, so peft's own matching (suffix
    # rules for lists) cannot select anything find_lora_targets did not.
    exact = "^(?:" + "|".join(re.escape(t) for t in targets) + ")$"
    peft_cfg = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=exact,
        bias="none",
        init_lora_weights=True,  # A Kaiming-uniform, B = 0: the adapted network starts as the base one
        use_rslora=False,
    )
    inject_adapter_in_model(peft_cfg, module, adapter_name=_ADAPTER)
    # peft stores its config on the model; ours is the record (the file header carries it).
    if hasattr(module, "peft_config"):
        del module.peft_config
    for p in module.parameters():
        if id(p) in flags:
            p.requires_grad_(flags[id(p)])
    for p in _adapter_params(module):
        p.requires_grad_(True)
    got = sorted(lora_layers(module))
    if got != sorted(targets):  # peft selecting other modules than asked would be a silent change
        raise RuntimeError(f"add_lora: peft wrapped {got}, expected {sorted(targets)}")
    module._recon3d_lora_config = config  # read by save_lora for the file header
    return module


def mark_only_lora_as_trainable(module: nn.Module, bias: Literal["none", "lora_only", "all"] = "none") -> None:
    """Set ``requires_grad`` so that only the LoRA ``A``/``B`` weights (and the chosen biases) train.

    Args:
        bias: ``"none"``: no bias trains; ``"lora_only"``: also the biases of the wrapped layers;
            ``"all"``: also every parameter named ``bias`` in ``module``. Save trained biases with
            ``save_lora(..., bias=...)`` (the same value), or they are lost.
    """
    if bias not in _BIAS_MODES:
        raise ConfigError(f"bias: expected one of {list(_BIAS_MODES)}, got {bias!r}")
    layers = _require_layers(module, "mark_only_lora_as_trainable")
    for p in module.parameters():
        p.requires_grad_(False)
    for p in _adapter_params(module):
        p.requires_grad_(True)
    if bias == "lora_only":
        for layer in layers.values():
            b = getattr(layer.get_base_layer(), "bias", None)
            if b is not None:
                b.requires_grad_(True)
    elif bias == "all":
        for name, p in module.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                p.requires_grad_(True)


def _plain_key(key: str) -> str:
    """peft state-dict key -> file key: drop the adapter name and the ``base_layer`` hop."""
    key = key.replace(f".lora_A.{_ADAPTER}.", ".lora_A.").replace(f".lora_B.{_ADAPTER}.", ".lora_B.")
    return key.replace(".base_layer.", ".")


def lora_state_dict(module: nn.Module, bias: Literal["none", "lora_only", "all"] = "none") -> dict[str, torch.Tensor]:
    """The adapter tensors only: ``{"<layer>.lora_A.weight": A, "<layer>.lora_B.weight": B}``
    (detached, not copied), plus the biases ``bias`` selects (see :func:`mark_only_lora_as_trainable`)
    under the base network's own keys (``"<layer>.bias"``). Linear: ``A (r, in)``, ``B (out, r)``."""
    if bias not in _BIAS_MODES:
        raise ConfigError(f"bias: expected one of {list(_BIAS_MODES)}, got {bias!r}")
    layers = _require_layers(module, "lora_state_dict")
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        out[f"{name}.lora_A.weight"] = layer.lora_A[_ADAPTER].weight.detach()
        out[f"{name}.lora_B.weight"] = layer.lora_B[_ADAPTER].weight.detach()
        if bias == "lora_only" and getattr(layer.get_base_layer(), "bias", None) is not None:
            out[f"{name}.bias"] = layer.get_base_layer().bias.detach()
    if bias == "all":
        for key, p in module.named_parameters():
            if key.rsplit(".", 1)[-1] == "bias":
                out[_plain_key(key)] = p.detach()
    return out


def _module_lora_settings(module: nn.Module, layers: dict[str, nn.Module]) -> tuple[int, float]:
    """The one ``(r, alpha)`` every LoRA layer of ``module`` shares."""
    settings = {(int(layer.r[_ADAPTER]), float(layer.lora_alpha[_ADAPTER])) for layer in layers.values()}
    if len(settings) != 1:
        raise ConfigError(f"{type(module).__name__}: LoRA layers with different (r, alpha): {sorted(settings)}")
    return settings.pop()


def save_lora(module: nn.Module, path: str | Path, bias: Literal["none", "lora_only", "all"] = "none") -> Path:
    """Write :func:`lora_state_dict` to a ``.safetensors`` file (atomically) with a metadata header.

    Header (strings): ``format`` = ``recon3d-lora``, ``version``, ``r``, ``alpha``, ``scaling``
    (``alpha / r``), ``targets`` (JSON list of the wrapped modules' names), ``bias``, and the
    config's ``target_modules`` / ``exclude`` / ``dropout`` (JSON) so :func:`read_lora_config`
    can rebuild the adapter. Returns the path written.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"save_lora: {path}: expected a .safetensors path")
    layers = _require_layers(module, "save_lora")
    r, alpha = _module_lora_settings(module, layers)
    cfg = getattr(module, "_recon3d_lora_config", None)
    meta = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "r": str(r),
        "alpha": repr(alpha),
        "scaling": repr(alpha / r),
        "targets": json.dumps(list(layers)),
        "bias": bias,
        "target_modules": json.dumps(cfg.target_modules if cfg is not None else list(layers)),
        "exclude": json.dumps(cfg.exclude if cfg is not None else None),
        "dropout": repr(cfg.dropout if cfg is not None else 0.0),
    }
    from safetensors.torch import save_file

    # safetensors refuses shared or non-contiguous storage; the copies are small (adapters only).
    tensors = {k: v.contiguous().clone() for k, v in lora_state_dict(module, bias=bias).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def _read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: LoRA file not found")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if meta.get("format") != _FORMAT:
        raise CheckpointError(f"{path}: not a recon3d LoRA file (metadata 'format' is {meta.get('format')!r}, expected {_FORMAT!r})")
    if meta.get("version") != _FORMAT_VERSION:
        raise CheckpointError(f"{path}: metadata 'version' is {meta.get('version')!r}, this recon3d reads {_FORMAT_VERSION!r}")
    for key in ("r", "alpha", "targets", "bias"):
        if key not in meta:
            raise CheckpointError(f"{path}: metadata key {key!r} is missing")
    return tensors, meta


def read_lora_config(path: str | Path) -> LoRAConfig:
    """The :class:`LoRAConfig` a file was saved with, to rebuild the adapter on a fresh module
    (``load_lora(add_lora(net, read_lora_config(p)), p)``)."""
    _, meta = _read(path)
    try:
        return LoRAConfig(
            target_modules=json.loads(meta.get("target_modules", meta["targets"])),
            r=int(meta["r"]),
            alpha=float(meta["alpha"]),
            dropout=float(meta.get("dropout", "0.0")),
            exclude=json.loads(meta.get("exclude", "null")),
        )
    except (ValueError, ConfigError) as e:
        raise CheckpointError(f"{path}: metadata does not form a LoRA config ({e})") from None


class LoadResult(NamedTuple):
    """Keys of the module's adapter state missing from the file, and file keys with no place in it."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def load_lora(module: nn.Module, path: str | Path, strict: bool = True) -> LoadResult:
    """Copy an adapter file written by :func:`save_lora` into ``module``'s LoRA layers.

    The header is checked first: ``r`` and ``alpha`` must equal the module's (they set the
    scaling, so a mismatch would silently change outputs; always checked), and with
    ``strict=True`` the wrapped modules (``targets``) and the tensor keys must be the same sets.
    A mismatch is a one-line :class:`CheckpointError` naming the key and both values. With
    ``strict=False`` the common keys are loaded and the others returned. Shapes must always
    match; values are cast to each parameter's dtype and device.
    """
    path = Path(path)
    tensors, meta = _read(path)
    layers = _require_layers(module, "load_lora")
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        # New A/B under a weight that already holds the old update would leave the two out of step.
        raise ConfigError(f"load_lora: {merged[0]} has its adapter merged into the weight; unmerge_lora first")
    r, alpha = _module_lora_settings(module, layers)
    try:
        file_r, file_alpha = int(meta["r"]), float(meta["alpha"])
        file_targets = json.loads(meta["targets"])
    except ValueError as e:
        raise CheckpointError(f"{path}: unreadable metadata ({e})") from None
    if file_r != r:
        raise CheckpointError(f"{path}: metadata 'r' is {file_r} in the file, {r} in the module's LoRA layers")
    if file_alpha != alpha:
        raise CheckpointError(f"{path}: metadata 'alpha' is {file_alpha:g} in the file, {alpha:g} in the module's LoRA layers")
    if strict and sorted(file_targets) != sorted(layers):
        only_file = sorted(set(file_targets) - set(layers))
        only_mod = sorted(set(layers) - set(file_targets))
        raise CheckpointError(
            f"{path}: metadata 'targets' differ from the module's LoRA layers (only in the file: {only_file[:4]}"
            f"{'...' if len(only_file) > 4 else ''}; only in the module: {only_mod[:4]}{'...' if len(only_mod) > 4 else ''})"
        )
    bias_mode = meta["bias"]
    if bias_mode not in _BIAS_MODES:
        raise CheckpointError(f"{path}: metadata 'bias' is {bias_mode!r}, expected one of {list(_BIAS_MODES)}")
    # Destination tensors under the file's key names, for what this file's bias mode saves.
    dest = lora_state_dict(module, bias=bias_mode)
    missing = sorted(set(dest) - set(tensors))
    unexpected = sorted(set(tensors) - set(dest))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path}: adapter keys differ: {len(missing)} missing from the file {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}"
        )
    for key in sorted(set(dest) & set(tensors)):
        if tensors[key].shape != dest[key].shape:
            raise CheckpointError(f"{path}: {key}: shape {tuple(tensors[key].shape)} in the file, {tuple(dest[key].shape)} in the module")
    with torch.no_grad():
        for key in sorted(set(dest) & set(tensors)):
            dest[key].copy_(tensors[key])
    return LoadResult(missing, unexpected)


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (root.get_submodule(parent) if parent else root), child


def merge_lora(module: nn.Module, unload: bool = True) -> nn.Module:
    """Fold every adapter into its base weight, ``W <- W + (alpha / r) * B @ A`` (peft's merge).

    With ``unload=True`` (inference) each LoRA layer is then replaced by its base layer, so
    ``module`` is a plain network again with the original state-dict keys and no peft modules;
    the adapter weights are gone (save them first). With ``unload=False`` the layers stay, their
    forward uses the merged weight, and :func:`unmerge_lora` takes the update back out. A
    non-finite merged weight raises :class:`~recon3d.errors.ShapeError` naming the layer.
    Returns ``module``.
    """
    layers = _require_layers(module, "merge_lora")
    for name, layer in layers.items():
        if not layer.merged:
            try:
                layer.merge(safe_merge=True, adapter_names=[_ADAPTER])
            except ValueError as e:
                raise ShapeError(f"merge_lora: {name}: the merged weight is not finite ({e})") from None
        if unload:
            parent, child = _parent(module, name)
            setattr(parent, child, layer.get_base_layer())
    if unload and hasattr(module, "_recon3d_lora_config"):
        del module._recon3d_lora_config
    return module


def unmerge_lora(module: nn.Module) -> None:
    """Undo ``merge_lora(module, unload=False)``: subtract the update from every merged base weight
    (floating-point exact only up to rounding)."""
    for layer in _require_layers(module, "unmerge_lora").values():
        if layer.merged:
            layer.unmerge()


def set_lora_enabled(module: nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer's adapter path on or off (off: the base network's output, e.g. to
    compare against it). ``requires_grad`` of the adapter weights is left as it was."""
    layers = _require_layers(module, "set_lora_enabled")
    flags = [(p, p.requires_grad) for p in _adapter_params(module)]
    for layer in layers.values():
        if layer.merged:
            raise ConfigError("set_lora_enabled: the adapters are merged into the weights; unmerge_lora first")
        layer.enable_adapters(bool(enabled))  # peft also flips requires_grad; restored below
    for p, flag in flags:
        p.requires_grad_(flag)


@contextlib.contextmanager
def lora_disabled(module: nn.Module) -> Iterator[nn.Module]:
    """``with lora_disabled(net): base = net(x)``: the base network inside, adapters back on after."""
    set_lora_enabled(module, False)
    try:
        yield module
    finally:
        set_lora_enabled(module, True)
