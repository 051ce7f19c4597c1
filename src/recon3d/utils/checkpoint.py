"""Safe weight loading: ``torch.load(weights_only=True)`` or safetensors, strict key matching.

A checkpoint that needs arbitrary pickled code is refused unless the caller opts in with
``allow_pickle=True`` (the CLI exposes it as an explicit flag), because unpickling a stranger's
file can execute code.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from recon3d.errors import CheckpointError

__all__ = ["load_state_dict_file", "load_weights_into", "extract_state_dict", "state_dict_mismatch"]


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


def state_dict_mismatch(own: dict, loaded: dict, strict: bool = True) -> str | None:
    """One line describing how ``loaded`` differs from ``own`` (missing / unexpected keys, other
    shapes), or None when it fits. Shape differences always count; key differences only if ``strict``."""
    missing = sorted(set(own) - set(loaded))
    unexpected = sorted(set(loaded) - set(own))
    shapes = [f"{k} {tuple(loaded[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(own.keys() & loaded.keys())
              if hasattr(loaded[k], "shape") and loaded[k].shape != own[k].shape]
    if not shapes and not (strict and (missing or unexpected)):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if shapes:
        parts.append(f"{len(shapes)} with other shapes (checkpoint vs model, e.g. {shapes[:2]})")
    return "; ".join(parts)


def load_weights_into(module: torch.nn.Module, path: str | Path, prefix: str = "", strict: bool = True, allow_pickle: bool = False) -> None:
    """Load weights from ``path`` into ``module`` with a one-line error listing mismatches."""
    sd = extract_state_dict(load_state_dict_file(path, allow_pickle), prefix)
    problem = state_dict_mismatch(module.state_dict(), sd, strict)
    if problem:
        raise CheckpointError(f"{path}: weights do not match {type(module).__name__}: {problem}")
    module.load_state_dict(sd, strict=strict)
