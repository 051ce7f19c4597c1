"""Geometry algorithms shared by every layer: iso-surface extraction and surface sampling.

Plain torch/numpy on meshes and grids; imports nothing of recon3d but ``errors`` and ``utils``, so
``data`` (ground-truth surfaces), ``render``/``metrics`` and ``methods`` all build on it without
importing each other (layering: DESIGN.md, ``tests/test_layering.py``).
"""

from recon3d.geometry.isosurface import EmptySurfaceError, grid_points, marching_cubes, marching_cubes_fast
from recon3d.geometry.surface import check_mesh, sample_surface

__all__ = ["EmptySurfaceError", "grid_points", "marching_cubes", "marching_cubes_fast", "check_mesh", "sample_surface"]
