"""Backend selection for the renderer layer.

Every renderer has a pure-torch reference (``"torch"``) and, where a CUDA library is importable
and the tensors live on a CUDA device, that library as a faster backend. The choice is made
when a renderer is built (never at import, so ``import recon3d`` works on any machine):

- ``"torch"``: always the reference;
- ``"<library>"`` (``"gsplat"``, ``"nvdiffrast"``, ``"diso"``): that library, or
  :class:`~recon3d.errors.BackendUnavailableError` when it cannot be used;
- ``"auto"``: the library when usable, else the reference with a single warning.

Each decision is logged once per (capability, outcome), so a training loop that rebuilds a
renderer does not flood the log.
"""

from __future__ import annotations

import functools
import importlib
import logging
import warnings

import torch

from recon3d.errors import BackendUnavailableError, ConfigError

__all__ = ["has_gsplat", "has_nvdiffrast", "has_diso", "library_available", "resolve_backend"]

log = logging.getLogger(__name__)

_IMPORT_CHECKS = {
    # gsplat imports on CPU machines but its rasterizer needs the compiled extension.
    "gsplat": ("gsplat", "gsplat.cuda._backend"),
    "nvdiffrast": ("nvdiffrast.torch",),
    "diso": ("diso",),
}
_announced: set[tuple] = set()


@functools.cache
def _import_error(library: str) -> str | None:
    """``None`` when ``library`` imports, else a one-line reason."""
    try:
        for mod in _IMPORT_CHECKS[library]:
            importlib.import_module(mod)
    except Exception as err:  # noqa: BLE001 - any import failure means "not usable here"
        return f"{type(err).__name__}: {err}".splitlines()[0]
    if library == "gsplat":
        from gsplat.cuda._backend import _C  # type: ignore[attr-defined]

        if _C is None:
            return "gsplat's CUDA extension (gsplat_cuda) is not built"
    return None


def library_available(library: str) -> bool:
    """Whether ``library`` (a key of the supported CUDA libraries) imports here."""
    if library not in _IMPORT_CHECKS:
        raise ConfigError(f"backend library: expected one of {sorted(_IMPORT_CHECKS)}, got {library!r}")
    return _import_error(library) is None and torch.cuda.is_available()


def has_gsplat() -> bool:
    """Whether gsplat's CUDA rasterizer can be used."""
    return library_available("gsplat")


def has_nvdiffrast() -> bool:
    """Whether nvdiffrast's CUDA rasterizer can be used."""
    return library_available("nvdiffrast")


def has_diso() -> bool:
    """Whether diso's DiffMC can be used."""
    return library_available("diso")


def resolve_backend(requested: str, library: str, device: torch.device | str | None = None, what: str = "renderer") -> str:
    """Turn ``"auto" | "torch" | <library>`` into ``"torch"`` or ``library``.

    Args:
        requested: the configured backend name.
        library: the CUDA library this capability can use (``"gsplat"``, ``"nvdiffrast"``, ``"diso"``).
        device: where the renderer's tensors will live; a CPU device always means ``"torch"``
            under ``"auto"``, and an error for an explicit library.
        what: the capability's name, for messages.
    """
    if requested not in ("auto", "torch", library):
        raise ConfigError(f"{what} backend: expected 'auto', 'torch' or {library!r}, got {requested!r}")
    if requested == "torch":
        _announce(what, "torch", "requested")
        return "torch"
    on_cuda = device is None or torch.device(device).type == "cuda"
    reason = _import_error(library)
    if reason is None and not torch.cuda.is_available():
        reason = "no CUDA device"
    if reason is None and not on_cuda:
        reason = f"tensors are on {torch.device(device).type}, {library} needs CUDA"
    if reason is None:
        _announce(what, library, "available")
        return library
    if requested == library:
        raise BackendUnavailableError(f"{what} backend {library!r} requested but unusable here: {reason}")
    key = (what, "fallback", library)
    if key not in _announced:
        _announced.add(key)
        warnings.warn(f"{what}: backend 'auto' falls back to the pure-torch reference ({library}: {reason})", stacklevel=2)
    return "torch"


def _announce(what: str, backend: str, why: str) -> None:
    key = (what, backend)
    if key not in _announced:
        _announced.add(key)
        log.info("%s backend: %s (%s)", what, backend, why)
