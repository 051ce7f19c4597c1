"""The shared renderer layer: every method renders through here, never through its own renderer.

Each capability has a pure-torch reference (used by every CPU test) and, where importable and on
CUDA, a CUDA library backend picked by ``backend: auto | torch | <library>`` when the renderer is
built (:mod:`recon3d.render.backends`). Cameras are always :class:`recon3d.data.cameras.Cameras`.
Every renderer returns one :class:`~recon3d.representations.RenderOutput` (``rgb``, ``alpha``,
``depth``, ``normal``); :func:`render` draws any representation with the right one.
"""

from recon3d.render.backends import has_diso, has_gsplat, has_nvdiffrast, resolve_backend
from recon3d.render.dispatch import register_renderer, render, renderable_types
from recon3d.render.export import bake_texture, save_gaussians, save_image_grid, save_mesh, save_video, turntable_cameras
from recon3d.render.gaussians import GaussianRasterizer, Gaussians, TorchGaussianRasterizer, load_ply, save_ply
from recon3d.render.isosurface import EmptySurfaceError, IsoSurfaceExtractor, grid_points, marching_cubes, marching_cubes_fast
from recon3d.render.mesh import Fragments, MeshRasterizer, TorchMeshRasterizer, sample_texture, vertex_normals
from recon3d.render.sdf_density import LaplaceDensity, NeuSDensity
from recon3d.render.triplane import sample_triplane
from recon3d.render.volume import VolumeRenderer, composite, importance_samples, ray_aabb, stratified_samples

__all__ = [
    "render", "register_renderer", "renderable_types",
    "has_gsplat", "has_nvdiffrast", "has_diso", "resolve_backend",
    "VolumeRenderer", "composite", "ray_aabb", "stratified_samples", "importance_samples",
    "LaplaceDensity", "NeuSDensity", "sample_triplane",
    "Gaussians", "GaussianRasterizer", "TorchGaussianRasterizer", "save_ply", "load_ply",
    "MeshRasterizer", "TorchMeshRasterizer", "Fragments", "sample_texture", "vertex_normals",
    "marching_cubes", "marching_cubes_fast", "IsoSurfaceExtractor", "EmptySurfaceError", "grid_points",
    "save_mesh", "bake_texture", "save_gaussians", "save_video", "save_image_grid", "turntable_cameras",
]
