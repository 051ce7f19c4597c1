"""Mesh rasterization: torch z-buffer reference, nvdiffrast backend, texture lookup."""

from __future__ import annotations

import torch
from torch import nn

from recon3d.data.cameras import Cameras
from recon3d.render.backends import resolve_backend
from recon3d.render.mesh.texture import sample_texture
from recon3d.render.mesh.torch_rasterizer import Fragments, TorchMeshRasterizer, project_vertices, rasterize_screen
from recon3d.representations.meshes import vertex_normals  # moved; re-exported here

__all__ = ["MeshRasterizer", "TorchMeshRasterizer", "Fragments", "sample_texture", "project_vertices", "rasterize_screen", "vertex_normals"]


class MeshRasterizer(nn.Module):
    """Rasterize meshes with ``backend: auto | torch | nvdiffrast`` (chosen here, once).

    Forward: ``(verts (B, Nv, 3), faces (F, 3), cameras (B, V))`` → :class:`Fragments`.
    ``kwargs`` go to the backend (``sigma``, ``near``; nvdiffrast also ``far``, ``antialias``).
    """

    def __init__(self, backend: str = "auto", device: torch.device | str | None = "cpu", **kwargs):
        super().__init__()
        self.backend = resolve_backend(backend, "nvdiffrast", device, what="mesh rasterizer")
        if self.backend == "nvdiffrast":
            from recon3d.render.mesh.nvdiffrast_rasterizer import NvdiffrastMeshRasterizer

            self.impl = NvdiffrastMeshRasterizer(**kwargs)
        else:
            kwargs.pop("far", None)
            kwargs.pop("antialias", None)
            self.impl = TorchMeshRasterizer(**kwargs)

    def forward(self, verts: torch.Tensor, faces: torch.Tensor, cameras: Cameras) -> Fragments:
        return self.impl(verts, faces, cameras)
