"""One backend registry for every capability that has a faster library than its torch reference.

Renderers (``gsplat``, ``nvdiffrast``), the iso-surface extractor (``diso``) and the selective scan
of :mod:`recon3d.models.ssm` (``fused_cpu``, ``mamba_ssm``) all choose their backend here. Each
capability has a pure-torch reference (``"torch"``) and one or more registered libraries
(:func:`register_backend`: a name, the device types it runs on, and a probe that says why it
cannot be used). The choice (:func:`resolve_backend`) is made when a renderer is built, or per
call for the scan (never at import, so ``import recon3d`` works on any machine):

- ``"torch"``: always the reference;
- ``"<library>"``: that library, or :class:`~recon3d.errors.BackendUnavailableError` naming why
  it cannot be used here (not importable, no CUDA device, tensors on another device);
- ``"auto"``: the first of the capability's libraries usable for the tensors' device, else the
  reference with a single warning.

Each decision is logged once per (capability, outcome), so a training loop that rebuilds a
renderer (or calls the scan every step) does not flood the log. A capability in another layer
registers its own libraries (the scan's probe needs its C kernel), so this module imports nothing
above the render layer.
"""

from __future__ import annotations

import functools
import importlib
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from recon3d.errors import BackendUnavailableError, ConfigError

__all__ = [
    "Backend", "UnknownBackendError", "register_backend", "registered_backends", "backend_unusable",
    "has_gsplat", "has_nvdiffrast", "has_diso", "library_available", "resolve_backend",
]

log = logging.getLogger(__name__)


class UnknownBackendError(ConfigError, BackendUnavailableError):
    """A backend name that is neither ``auto``, ``torch`` nor a library of the capability: a config
    mistake (:class:`ConfigError`) that is also "this backend cannot be used"
    (:class:`BackendUnavailableError`, what callers of the scan have always caught)."""


@dataclass(frozen=True)
class Backend:
    """A registered library backend.

    Attributes:
        name: what a config names it by (``"gsplat"``, ``"fused_cpu"``, ...).
        devices: device types it runs on (``("cuda",)``, ``("cpu",)``).
        probe: ``() -> None`` when it can be used on this machine, else a one-line reason;
            called at most once per process (its answer is cached), only when the tensors' device
            is one of ``devices`` (so a CPU kernel is never compiled for CUDA inputs).
    """

    name: str
    devices: tuple[str, ...]
    probe: Callable[[], str | None]


_REGISTRY: dict[str, Backend] = {}
_announced: set[tuple] = set()


def register_backend(name: str, devices: Sequence[str], probe: Callable[[], str | None]) -> Backend:
    """Add (or replace) the library backend ``name``; returns its record."""
    if name in ("auto", "torch"):
        raise ConfigError(f"register_backend: {name!r} is reserved (the automatic choice / the torch reference)")
    b = Backend(name, tuple(devices), probe)
    _REGISTRY[name] = b
    _probe.cache_clear()
    _resolve.cache_clear()
    return b


def registered_backends() -> dict[str, Backend]:
    """The registered library backends by name (a copy)."""
    return dict(_REGISTRY)


@functools.cache
def _probe(name: str) -> str | None:
    b = _REGISTRY[name]
    reason = b.probe()
    # A CUDA-only library needs a CUDA device; one that also runs on the CPU (spconv's wheel) is
    # checked against the tensors' device in backend_unusable.
    if reason is None and "cpu" not in b.devices and not torch.cuda.is_available():
        reason = "no CUDA device"
    return reason


def backend_unusable(name: str, device_type: str | None = None) -> str | None:
    """None when library ``name`` can run here (on ``device_type`` tensors, if given), else why not."""
    if name not in _REGISTRY:
        raise UnknownBackendError(f"backend library: expected one of {sorted(_REGISTRY)}, got {name!r}")
    b = _REGISTRY[name]
    if device_type is not None and device_type not in b.devices:
        return f"tensors are on {device_type}, {name} needs {' or '.join(b.devices)}"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    return _probe(name)


# ---------------------------------------------------------------------------- the render libraries
_IMPORT_CHECKS = {
    # gsplat imports on CPU machines but its rasterizer needs the compiled extension.
    "gsplat": ("gsplat", "gsplat.cuda._backend"),
    "nvdiffrast": ("nvdiffrast.torch",),
    "diso": ("diso",),
}


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
    """Whether the registered ``library`` can be used on this machine."""
    return backend_unusable(library) is None


def has_gsplat() -> bool:
    """Whether gsplat's CUDA rasterizer can be used."""
    return library_available("gsplat")


def has_nvdiffrast() -> bool:
    """Whether nvdiffrast's CUDA rasterizer can be used."""
    return library_available("nvdiffrast")


def has_diso() -> bool:
    """Whether diso's DiffMC can be used."""
    return library_available("diso")


# ---------------------------------------------------------------------------- the choice
def resolve_backend(requested: str, library: str | Sequence[str], device: torch.device | str | None = None,
                    what: str = "renderer") -> str:
    """Turn ``"auto" | "torch" | <library>`` into ``"torch"`` or a library name.

    Args:
        requested: the configured backend name.
        library: the capability's registered libraries, fastest first (one name for a renderer:
            ``"gsplat"``, ``"nvdiffrast"``, ``"diso"``; several for the scan).
        device: where the tensors will live; None means CUDA (a renderer built without a device).
            A device no library runs on means ``"torch"`` under ``"auto"`` and an error for an
            explicit library.
        what: the capability's name, for messages and the once-only log.
    """
    libs = (library,) if isinstance(library, str) else tuple(library)
    if device is None:
        dev = "cuda"
    elif isinstance(device, torch.device):
        dev = device.type
    else:
        dev = torch.device(device).type
    return _resolve(requested, libs, dev, what)


@functools.lru_cache(maxsize=256)
def _resolve(requested: str, libs: tuple[str, ...], dev: str, what: str) -> str:
    # Cached: the scan resolves on every call, and a decision (with its one log line) never
    # changes within a process. Errors are not cached, so every bad call raises.
    if requested not in ("auto", "torch", *libs):
        choices = ", ".join(repr(x) for x in ("auto", "torch", *libs))
        raise UnknownBackendError(f"{what} backend: expected one of {choices}, got {requested!r}")
    if requested == "torch":
        _announce(what, "torch", "requested")
        return "torch"
    reasons = []
    for lib in libs if requested == "auto" else (requested,):
        reason = backend_unusable(lib, dev)
        if reason is None:
            _announce(what, lib, "available")
            return lib
        if requested == lib:
            raise BackendUnavailableError(f"{what} backend {lib!r} requested but unusable here: {reason}")
        reasons.append(f"{lib}: {reason}")
    key = (what, "fallback", libs)
    if key not in _announced:
        _announced.add(key)
        warnings.warn(f"{what}: backend 'auto' falls back to the pure-torch reference ({'; '.join(reasons)})", stacklevel=3)
    return "torch"


def _announce(what: str, backend: str, why: str) -> None:
    key = (what, backend)
    if key not in _announced:
        _announced.add(key)
        log.info("%s backend: %s (%s)", what, backend, why)


for _lib in _IMPORT_CHECKS:
    register_backend(_lib, ("cuda",), functools.partial(_import_error, _lib))
