"""What a reconstruction *is*, independent of the method that made it and the renderer that
draws it: Gaussians (dense or ragged per object), meshes, sparse voxels, neural fields (generic
and triplane), and the one :class:`RenderOutput` every renderer returns.

The bottom layer with ``data/``: it imports torch, numpy, :mod:`recon3d.errors` and
:mod:`recon3d.utils.checks` only (trimesh / Pillow lazily, for mesh conversion). Renderers
(:func:`recon3d.render.render`), exporters (:mod:`recon3d.render.export`) and metrics take
these types.
"""

from recon3d.representations.fields import NeuralField, Triplanes
from recon3d.representations.gaussians import SH_C0, Gaussians, eval_sh, quat_to_rotmat, rgb_to_sh_dc, sh_dc_to_rgb
from recon3d.representations.meshes import Meshes, vertex_normals
from recon3d.representations.render_output import RENDER_QUANTITIES, RenderOutput
from recon3d.representations.voxels import SparseVoxels

__all__ = [
    "Gaussians", "Meshes", "SparseVoxels", "NeuralField", "Triplanes", "RenderOutput", "RENDER_QUANTITIES",
    "eval_sh", "quat_to_rotmat", "rgb_to_sh_dc", "sh_dc_to_rgb", "SH_C0", "vertex_normals",
]
