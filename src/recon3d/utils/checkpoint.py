"""Safe weight loading: ``torch.load(weights_only=True)`` or safetensors, strict key matching.

A checkpoint that needs arbitrary pickled code is refused unless the caller opts in with
``allow_pickle=True`` (the CLI exposes it as an explicit flag), because unpickling a stranger's
file can execute code.

Loading is strict: every key of the model must be in the file and every tensor of the file must
fit a key of the model, with the same shape. A partial load names what may differ, as glob
patterns (``ignore=["lpips.*"]``; ``model.init_args.init_weights_ignore`` in a config): keys
matching them may be missing from the file, extra in it, or of another shape, and are then left
as the model initialised them. A Lightning checkpoint records the LightningModule class it was
trained with (``hyper_parameters["_class_path"]``); when that class is not the model's and the
weights do not fit, the error says so first ("this checkpoint is an M3DModule, the config is a
GTRModule").
"""

from __future__ import annotations

import fnmatch
import logging
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch

from recon3d.errors import CheckpointError

__all__ = [
    "load_state_dict_file", "load_weights_into", "extract_state_dict", "state_dict_mismatch", "checkpoint_class",
    "checkpoint_class_mismatch",
]

log = logging.getLogger(__name__)


def load_state_dict_file(path: str | Path, allow_pickle: bool = False) -> dict:
    """Load a ``.safetensors``, ``.ckpt``/``.pt``/``.pth`` file into a dict on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    with open(path, "rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch zip archive nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e) and "GLOBAL" not in str(e):
            raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({str(e).strip().splitlines()[-1][:160]})") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported pickled object"
        raise CheckpointError(
            f"{path}: refused to load: the file contains pickled code or objects that weights-only loading does not "
            f"allow ({first[:160]}); if you trust its source, pass allow_pickle / --allow-pickle explicitly"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint or truncated ({type(e).__name__}: {str(e)[:160]})") from None


def extract_state_dict(obj: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensor state dict inside a Lightning checkpoint (``state_dict``) or a plain dict,
    keeping only keys under ``prefix`` (stripped)."""
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError("checkpoint: expected a dict of tensors or a Lightning checkpoint with 'state_dict'")
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}
    if not out:
        raise CheckpointError(f"checkpoint: no tensors under prefix {prefix!r}")
    return out


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _suggest(keys: Sequence[str]) -> list[str]:
    """Glob patterns covering ``keys`` by their first component (``["lpips.*", ...]``, at most 3)."""
    return sorted({k.split(".")[0] + (".*" if "." in k else "") for k in keys})[:3]


def state_dict_mismatch(own: dict, loaded: dict, strict: bool = True, ignore: Sequence[str] = ()) -> str | None:
    """One line describing how ``loaded`` differs from ``own`` (missing / unexpected keys, other
    shapes), or None when it fits. Shape differences always count; key differences only if
    ``strict``. Keys matching a glob pattern of ``ignore`` never count."""
    ignore = tuple(ignore or ())
    missing = sorted(k for k in set(own) - set(loaded) if not _matches(k, ignore))
    unexpected = sorted(k for k in set(loaded) - set(own) if not _matches(k, ignore))
    shapes = [f"{k} {tuple(loaded[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(own.keys() & loaded.keys())
              if hasattr(loaded[k], "shape") and loaded[k].shape != own[k].shape and not _matches(k, ignore)]
    if not shapes and not (strict and (missing or unexpected)):
        return None
    parts = []
    if strict and (missing or unexpected):
        parts.append(f"{len(own.keys() & loaded.keys())} of {len(own)} model keys found")
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if shapes:
        parts.append(f"{len(shapes)} with other shapes (checkpoint vs model, e.g. {shapes[:2]})")
    return "; ".join(parts)


def checkpoint_class(ckpt: object) -> str | None:
    """The LightningModule class path a Lightning checkpoint was trained with
    (``hyper_parameters["_class_path"]``, written by LightningCLI), or None when it records none."""
    if not isinstance(ckpt, dict):
        return None
    hp = ckpt.get("hyper_parameters")
    path = hp.get("_class_path") if isinstance(hp, dict) else None
    return path if isinstance(path, str) and path else None


def checkpoint_class_mismatch(ckpt: object, model: torch.nn.Module | type | str) -> str | None:
    """``"this checkpoint is an M3DModule, the config is a GTRModule"`` when the class recorded in
    ``ckpt`` is not ``model``'s (an instance, a class, or a ``class_path`` string), else None.

    Classes are compared by name (the last component of the path) so that a class re-exported
    from another module still matches; the recorded path is never imported (a checkpoint is
    untrusted input).
    """
    recorded = checkpoint_class(ckpt)
    if recorded is None:
        return None
    if isinstance(model, str):
        name = model.rsplit(".", 1)[-1]
    else:
        name = (model if isinstance(model, type) else type(model)).__name__
    got = recorded.rsplit(".", 1)[-1]
    if got == name:
        return None
    return f"this checkpoint is {_article(got)} {got}, the config is {_article(name)} {name}"


def _article(word: str) -> str:
    # An acronym is read letter by letter ("an M3DModule", "a GTRModule"), a word as a word
    # ("a ToyTriplaneModule", "an EncoderModule").
    if len(word) > 1 and (word[1].isupper() or word[1].isdigit()):
        return "an" if word[0].upper() in "AEFHILMNORSX" else "a"
    return "an" if word[:1].lower() in "aeiou" else "a"


def load_weights_into(
    module: torch.nn.Module,
    path: str | Path,
    prefix: str = "",
    strict: bool = True,
    allow_pickle: bool = False,
    ignore: Sequence[str] | None = None,
) -> list[str]:
    """Load weights from ``path`` into ``module``; any mismatch is one :class:`CheckpointError` line.

    Args:
        module: the model to load into.
        path: ``.ckpt`` / ``.pt`` / ``.pth`` (a Lightning checkpoint or a bare state dict) or
            ``.safetensors``.
        prefix: load only the file's keys under this prefix (stripped).
        strict: every key must match (default). ``False`` only tolerates missing/extra keys and
            still refuses other shapes; prefer ``ignore``, which names what may differ.
        allow_pickle: trust a file that needs pickled code.
        ignore: glob patterns of keys that may be missing, unexpected or of another shape; such
            keys keep the model's own values (e.g. ``["lpips.*"]`` for a frozen loss network
            that the previous stage did not have).

    Returns the keys left at the model's own values (those ``ignore`` allowed to differ).

    The error names the file, the model class, "this checkpoint is an X, the config is a Y" when
    the checkpoint records another LightningModule class, how many model keys the file holds,
    the first missing / unexpected / other-shaped keys with counts, and the option to name them.
    """
    ignore = list(ignore or ())
    obj = load_state_dict_file(path, allow_pickle)
    sd = extract_state_dict(obj, prefix)
    own = module.state_dict()
    problem = state_dict_mismatch(own, sd, strict, ignore)
    other_class = checkpoint_class_mismatch(obj, module)
    if problem:
        head = f"{other_class}; " if other_class else ""
        missing = [k for k in own if k not in sd]
        hint = f"; to load part of it, name the keys that may differ in init_weights_ignore (e.g. {_suggest(missing or list(sd))})" if not other_class else ""
        raise CheckpointError(f"{path}: weights do not match {type(module).__name__}: {head}{problem}{hint}")
    if other_class:
        log.warning("%s: %s, but its weights fit; loading them", path, other_class)
    fit = {k: v for k, v in sd.items() if k in own and not (_matches(k, ignore) and v.shape != own[k].shape)}
    left = sorted(k for k in own if k not in fit)
    module.load_state_dict(fit, strict=strict and not left)
    if left:
        log.info("%s: %d keys matching init_weights_ignore %s keep their initial values (e.g. %s)", path, len(left), ignore, left[:3])
    return left
