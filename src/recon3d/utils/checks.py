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
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch

from recon3d.errors import ShapeError

__all__ = ["check_shape", "check_finite", "check_range"]


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
