"""Where cached monocular depth priors live on disk, and how a dataset reads them back.

The cache is written once, offline, by ``recon3d data depth`` (:mod:`recon3d.commands.data`, which
runs :func:`recon3d.models.depth_prior.compute_depth_cache`); datasets only read it. Keeping the
path rule here, in the data layer, is what lets a dataset find its priors without importing the
model that made them.

Layout: ``out_dir / <key>.npy``, one ``float32 (H, W)`` array per image; ``key`` is a relative,
suffix-less name (a dataset's ``depth_cache_items()`` chooses it, e.g. 3D-FRONT's ``imgid``
without its extension; a plain image list uses file stems).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from recon3d.errors import DataError

__all__ = ["DEPTH_CACHE_COMMAND", "depth_cache_path", "load_cached_depth"]

#: The command named in errors about a missing cached depth.
DEPTH_CACHE_COMMAND = "recon3d data depth --model-dir <depth-anything dir> --out {out_dir} ..."


def depth_cache_path(out_dir: str | os.PathLike, key: str) -> Path:
    """Path of the cached depth of ``key`` (a relative, suffix-less name) under ``out_dir``."""
    rel = Path(key)
    if rel.is_absolute() or ".." in rel.parts:
        raise DataError(key, "depth cache key must be a relative path without '..'")
    return Path(out_dir) / rel.with_suffix(rel.suffix + ".npy") if rel.suffix else Path(out_dir) / f"{key}.npy"


def load_cached_depth(out_dir: str | os.PathLike, key: str, expect_size: tuple[int, int] | None = None,
                      how_to_make: str | None = None) -> np.ndarray:
    """Read the cached ``float32 (H, W)`` depth of ``key``.

    Args:
        out_dir: cache root; key: as in :func:`depth_cache_path`.
        expect_size: ``(H, W)`` the map must have (None: any 2-D shape).
        how_to_make: the command to print when the entry is missing or unreadable (default
            :data:`DEPTH_CACHE_COMMAND` for ``out_dir``); a dataset names its own source options.

    Raises:
        DataError: naming the file, when it is missing, unreadable, of another shape or not finite.
    """
    path = depth_cache_path(out_dir, key)
    make = how_to_make if how_to_make is not None else DEPTH_CACHE_COMMAND.format(out_dir=out_dir)
    if not path.is_file():
        raise DataError(path, f"cached depth prior is missing; make it with: {make}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(path, f"cannot read cached depth ({e}); delete it and rerun: {make}") from None
    if arr.ndim != 2 or (expect_size is not None and arr.shape != tuple(expect_size)):
        raise DataError(path, f"expected a depth map of shape {expect_size or '(H, W)'}, got {arr.shape}; rerun the depth cache")
    if not np.isfinite(arr).all():
        raise DataError(path, "cached depth contains NaN or inf")
    return arr.astype(np.float32, copy=False)
