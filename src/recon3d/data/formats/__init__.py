"""Readers and writers of public multi-view render formats, all converting to recon3d's cameras.

=========================  ==========================================  ==============================
class                      layout                                      writer
=========================  ==========================================  ==============================
``BlenderDataset``         ``transforms_{split}.json`` + images        :func:`write_blender`
``OpenLRMDataset``         ``<uid>/{rgba,pose}/NNN`` + intrinsics.npy  :func:`write_openlrm`
``InstantMeshDataset``     ``<uid>/NNN.png`` + ``cameras.npz``         :func:`write_instantmesh`
``GTRViewsDataset``        ``rgb_XXX.png`` + ``cam_XXX.txt``           :func:`write_gtr_views`
``ImageFolderDataset``     ``<name>.png`` per object (single images,   none
                           unposed; optional masks/ + cameras.json)
``RenderedMeshesDataset``  Blender folders with view sets (input,      ``recon3d data render-meshes``
                           orbit, random), depth, normals, mesh.ply
=========================  ==========================================  ==============================

Each module's docstring states the file convention and the conversion to OpenCV c2w + pixel K.
Bad files raise :class:`recon3d.errors.DataError` naming the file and what was expected.
"""

from recon3d.data.formats.blender import BlenderDataset, write_blender
from recon3d.data.formats.gtr_views import GTRViewsDataset, read_gtr_camera, write_gtr_views
from recon3d.data.formats.image_folder import ImageFolderDataset
from recon3d.data.formats.instantmesh import InstantMeshDataset, write_instantmesh
from recon3d.data.formats.openlrm import OpenLRMDataset, write_openlrm
from recon3d.data.formats.rendered_meshes import RenderedMeshesDataset

__all__ = [
    "BlenderDataset", "write_blender",
    "OpenLRMDataset", "write_openlrm",
    "InstantMeshDataset", "write_instantmesh",
    "GTRViewsDataset", "write_gtr_views", "read_gtr_camera",
    "ImageFolderDataset",
    "RenderedMeshesDataset",
]
