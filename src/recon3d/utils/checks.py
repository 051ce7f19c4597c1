"""Shape and value checks at the edge of public functions (kornia's ``KORNIA_CHECK_SHAPE`` idea).

A spec is a space-separated string of dimensions:

- an integer (``3``) must match exactly;
- a name (``B``, ``H``) binds on first use and must agree afterwards, across all tensors
  checked with the same ``dims`` dict;
- ``_`` matches any size;
- a leading ``*`` (``*B``) matches any number (zero or more) of leading batch dimensions.

Example::

    dims = {}
    check_shape(c2w, "*B 4 4", "c2w", dims)
    check_shape(K, "*B 3 3", "intrinsics", dims)

Configuration values are checked where a class is configured (:func:`check_option`, :func:`check_adamw_options`,
:func:`check_weights`), so a NaN loss weight or a negative learning rate stops the run with one
:class:`~recon3d.errors.ConfigError` line naming the key, instead of silently dropping a loss term.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping

import torch

from recon3d.errors import ConfigError, ShapeError

__all__ = ["check_shape", "check_finite", "check_range", "check_option", "check_adamw_options", "check_weights", "merge_weights"]


def check_shape(
    x: torch.Tensor,
    spec: str,
    name: str,
    dims: MutableMapping[str, object] | None = None,
) -> dict:
    """Raise :class:`ShapeError` naming ``name`` unless ``x.shape`` matches ``spec``.

    Returns the dictionary of bound dimension sizes (the same object as ``dims`` when given),
    with the leading batch shape of a ``*X`` token bound as a tuple under ``X``.
    """
    if dims is None:
        dims = {}
    if not isinstance(x, torch.Tensor):
        raise ShapeError(f"{name}: expected a torch.Tensor of shape ({spec}), got {type(x).__name__}")
    tokens = spec.split()
    shape = tuple(x.shape)
    star = tokens[0][1:] if tokens and tokens[0].startswith("*") else None
    fixed = tokens[1:] if star is not None else tokens
    if star is None and len(shape) != len(fixed) or star is not None and len(shape) < len(fixed):
        raise ShapeError(f"{name}: expected shape ({spec}), got {list(shape)} ({len(shape)} dims)")
    lead = shape[: len(shape) - len(fixed)]
    if star:
        bound = dims.get(star)
        if bound is not None and tuple(bound) != lead:
            raise ShapeError(f"{name}: expected batch dims {star}={list(bound)}, got {list(lead)} in shape {list(shape)}")
        dims[star] = lead
    for tok, size in zip(fixed, shape[len(lead):]):
        if tok == "_":
            continue
        if tok.lstrip("-").isdigit():
            if size != int(tok):
                raise ShapeError(f"{name}: expected shape ({spec}), got {list(shape)}")
            continue
        bound = dims.get(tok)
        if bound is None:
            dims[tok] = size
        elif bound != size:
            raise ShapeError(f"{name}: expected dimension {tok}={bound} in ({spec}), got {list(shape)}")
    return dims  # type: ignore[return-value]


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise :class:`ShapeError` naming ``name`` if ``x`` holds NaN or inf."""
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise ShapeError(f"{name}: expected finite values, found {bad} NaN/inf entries")


def check_range(x: torch.Tensor, name: str, lo: float, hi: float, tol: float = 1e-4) -> None:
    """Raise :class:`ShapeError` unless every value of ``x`` lies in ``[lo, hi]`` (with ``tol``)."""
    if x.numel() and (x.min() < lo - tol or x.max() > hi + tol):
        raise ShapeError(
            f"{name}: expected values in [{lo}, {hi}], got [{float(x.min()):.4g}, {float(x.max()):.4g}]"
        )


def check_option(name: str, value: object, low: float | None = None, *, strict: bool = False, integer: bool = False,
                 allow_none: bool = False) -> None:
    """Raise :class:`ConfigError` naming ``name`` unless ``value`` is a finite number ``>= low``
    (``> low`` with ``strict``; an integer with ``integer``; None passes with ``allow_none``)."""
    if value is None and allow_none:
        return
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise ConfigError(f"{name}: expected {kind}, got {value!r}")
    if not math.isfinite(float(value)):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    if low is not None and (value <= low if strict else value < low):
        raise ConfigError(f"{name}: expected {kind} {'>' if strict else '>='} {low:g}, got {value!r}")


def check_adamw_options(lr: object, weight_decay: object, betas: object, warmup_steps: object = None) -> None:
    """The AdamW options every method takes (``model.lr``, ``model.weight_decay``, ``model.betas``
    and, where the method has a warm-up, ``model.warmup_steps``): one :class:`ConfigError` naming
    the first bad one, checked in that order. ``lr > 0``; ``weight_decay >= 0``; each beta in
    ``[0, 1)``; ``warmup_steps`` an integer ``>= 0`` (None: the method has none)."""
    check_option("model.lr", lr, 0.0, strict=True)
    check_option("model.weight_decay", weight_decay, 0.0)
    for i, b in enumerate(betas):
        check_option(f"model.betas[{i}]", b, 0.0)
        if b >= 1:
            raise ConfigError(f"model.betas[{i}]: expected a number in [0, 1), got {b!r}")
    if warmup_steps is not None:
        check_option("model.warmup_steps", warmup_steps, 0, integer=True)


def check_weights(name: str, weights: Mapping[str, object]) -> None:
    """Raise :class:`ConfigError` naming ``name.key`` unless every weight is a finite number ``>= 0``
    (a NaN weight would otherwise turn the total loss into NaN, or drop the term where the loss
    tests ``weight > 0``)."""
    for key, w in weights.items():
        check_option(f"{name}.{key}", w, 0.0)


def merge_weights(name: str, defaults: Mapping[str, float], overrides: Mapping[str, object] | None) -> dict[str, float]:
    """``defaults`` updated by ``overrides`` (a method's loss weights over its paper's), checked.

    Raises :class:`ConfigError` naming ``name`` for a key ``defaults`` does not have (a typo would
    otherwise train without the term it meant to weight), or naming ``name.key`` for a weight that
    is not a finite number ``>= 0`` (:func:`check_weights`). ``None`` or ``{}`` gives the defaults.
    """
    merged = dict(defaults)
    if overrides:
        unknown = set(overrides) - set(merged)
        if unknown:
            raise ConfigError(f"{name}: unknown terms {sorted(unknown)}; expected {sorted(merged)}")
        check_weights(name, overrides)
        merged.update(overrides)
    return merged

