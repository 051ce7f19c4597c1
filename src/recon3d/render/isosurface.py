"""Iso-surface extraction from an SDF grid, with a backend choice.

The algorithms and the grid convention live in :mod:`recon3d.geometry.isosurface` (below the data
layer, so datasets can extract ground-truth surfaces too); they are re-exported here under their
old names. This module adds what belongs to the render layer:

- :class:`DisoMarchingCubes`: ``diso.DiffMC`` on CUDA, chosen through ``backend``.
- :class:`IsoSurfaceExtractor`: one object a method builds once; ``method`` leaves room for
  FlexiCubes (not implemented yet).
"""

from __future__ import annotations

import torch

from recon3d.errors import ConfigError
from recon3d.geometry.isosurface import (
    EmptySurfaceError,
    check_grid,
    grid_points,
    grid_to_world,
    marching_cubes,
    marching_cubes_fast,
    nonempty,
    winding_points_inward,
)
from recon3d.render.backends import resolve_backend

__all__ = ["marching_cubes", "marching_cubes_fast", "DisoMarchingCubes", "IsoSurfaceExtractor", "EmptySurfaceError", "grid_points"]


class DisoMarchingCubes:
    """``diso.DiffMC`` (CUDA) with :func:`marching_cubes`'s interface; build once, call many times."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        try:
            from diso import DiffMC
        except Exception as err:  # noqa: BLE001
            from recon3d.errors import BackendUnavailableError

            raise BackendUnavailableError(f"isosurface backend 'diso' unusable: {err}") from err
        self._mc = DiffMC(dtype=dtype).cuda()

    def __call__(self, sdf: torch.Tensor, aabb=(-1.0, 1.0), level: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        check_grid(sdf, level)
        verts, faces = self._mc(sdf - level, None, normalize=False)
        verts = grid_to_world(verts, tuple(sdf.shape), aabb)
        faces = faces.long()
        if faces.numel() and winding_points_inward(verts.detach(), faces, sdf, aabb):
            faces = faces[:, [0, 2, 1]]
        return nonempty(verts, faces, level)


class IsoSurfaceExtractor:
    """SDF grid → mesh with a chosen backend.

    Args:
        backend: ``"auto" | "torch" | "diso"`` (resolved here, once).
        method: ``"mc"`` (marching cubes). ``"flexicubes"`` is reserved for a FlexiCubes
            extractor and raises until it exists.
        device: where the SDF grids will live (decides ``"auto"``).
    """

    def __init__(self, backend: str = "auto", method: str = "mc", device: torch.device | str | None = "cpu"):
        if method != "mc":
            raise ConfigError(f"IsoSurfaceExtractor: method {method!r} is not implemented (available: 'mc')")
        self.backend = resolve_backend(backend, "diso", device, what="isosurface")
        self._impl = DisoMarchingCubes() if self.backend == "diso" else marching_cubes

    def __call__(self, sdf: torch.Tensor, aabb=(-1.0, 1.0), level: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``sdf (X, Y, Z)`` → ``verts (V, 3)``, ``faces (F, 3)`` (see :func:`marching_cubes`)."""
        return self._impl(sdf, aabb, level)
