"""3D Gaussian splatting: the Gaussians container, rasterizers (torch reference, gsplat) and .ply I/O."""

from recon3d.render.gaussians.model import Gaussians, eval_sh, quat_to_rotmat
from recon3d.render.gaussians.ply import load_ply, save_ply
from recon3d.render.gaussians.rasterizer import GaussianRasterizer
from recon3d.render.gaussians.torch_rasterizer import TorchGaussianRasterizer, project_gaussians

__all__ = [
    "Gaussians",
    "eval_sh",
    "quat_to_rotmat",
    "TorchGaussianRasterizer",
    "GaussianRasterizer",
    "project_gaussians",
    "save_ply",
    "load_ply",
]
