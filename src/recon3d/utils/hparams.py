"""Hyper-parameters that a weights-only loader accepts.

Lightning's ``save_hyperparameters()`` stores a module's init args as given. Run from
``recon3d fit`` (LightningCLI) those are the parsed config: a sub-model appears as its
``{"class_path": ..., "init_args": ...}`` dict. Built in Python, an ``nn.Module`` argument (an
encoder, an evaluation protocol) is the object itself, and ``torch.save`` pickles it into the
checkpoint, which ``torch.load(weights_only=True)`` -- recon3d's only loader -- then refuses.

:func:`safe_hparams` turns every value into what weights-only unpickling allows (``None``,
``bool``, ``int``, ``float``, ``str``, tensors, and lists / tuples / dicts of them): a config dict
stays as it is, a path becomes its string, an enum its value, a dataclass the dict of its fields
(what jsonargparse accepts for a dataclass argument), a class or function its import path. An
object whose constructor arguments cannot be known from the object (an ``nn.Module`` built in
Python, any other instance) is *omitted*, with the reason recorded, never pickled: its weights
are in the ``state_dict`` anyway, and its config is only available where it was given as one.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import os
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["safe_hparams", "safe_value", "OmittedValue"]


class OmittedValue(Exception):
    """Raised by :func:`safe_value` for a value that cannot be stored without pickling; the
    message is the reason."""


def _import_path(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


def safe_value(value: Any, where: str = "value") -> Any:
    """``value`` as plain data that weights-only loading accepts (module docstring), or
    :class:`OmittedValue` saying why it cannot be. ``where`` names it in the reason."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, enum.Enum):
        return safe_value(value.value, where)
    if isinstance(value, int):  # subclasses (numpy's float64 is one of float) would pickle their class
        return int(value)
    if isinstance(value, float):
        return float(value)
    import numpy as np

    if isinstance(value, np.generic):
        return safe_value(value.item(), where)
    if isinstance(value, np.ndarray):
        return safe_value(value.tolist(), where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu").clone()
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise OmittedValue(f"{where}: a mapping with a {type(k).__name__} key")
            out[k] = safe_value(v, f"{where}.{k}")
        return out
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # named tuple: its class would be pickled
        return {f: safe_value(getattr(value, f), f"{where}.{f}") for f in value._fields}
    if isinstance(value, (list, tuple)):
        items = [safe_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, (set, frozenset)):
        items = [safe_value(v, f"{where}[]") for v in value]
        try:
            return sorted(items)
        except TypeError:
            return items
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: safe_value(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value) if f.init}
    if inspect.isclass(value) or inspect.isfunction(value) or inspect.isbuiltin(value):
        return _import_path(value)
    kind = "nn.Module" if isinstance(value, torch.nn.Module) else "object"
    raise OmittedValue(
        f"{where}: a {_import_path(type(value))} {kind} built in Python; its constructor arguments are not recorded "
        "(give it as a config, class_path + init_args, to have them saved; its weights are in the state_dict)"
    )


def safe_hparams(hparams: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``(kept, omitted)``: each hyper-parameter made safe (:func:`safe_value`), and
    ``{name: reason}`` for those that cannot be stored without pickling."""
    kept: dict[str, Any] = {}
    omitted: dict[str, str] = {}
    for name, value in hparams.items():
        try:
            kept[name] = safe_value(value, str(name))
        except OmittedValue as why:
            omitted[str(name)] = str(why)
    return kept, omitted
