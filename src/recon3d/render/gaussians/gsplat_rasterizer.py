"""gsplat backend for Gaussian rasterization (CUDA; imported lazily).

gsplat already uses OpenCV cameras (``viewmats`` = world-to-camera) and pixel intrinsics with
pixel centres at +0.5, wxyz quaternions and activated scales/opacities, so the conversion at this
edge is only the batch layout.
"""

from __future__ import annotations

import torch
from torch import nn

from recon3d.data.cameras import Cameras
from recon3d.errors import ShapeError
from recon3d.render.gaussians.model import Gaussians
from recon3d.render.volume import make_background
from recon3d.representations.render_output import RenderOutput

__all__ = ["GsplatGaussianRasterizer"]


class GsplatGaussianRasterizer(nn.Module):
    """``gsplat.rasterization`` with :class:`TorchGaussianRasterizer`'s interface and outputs."""

    def __init__(self, tile_size: int = 16, eps2d: float = 0.3, near: float = 0.01, far: float = 1e10, background="black"):
        super().__init__()
        import gsplat  # noqa: F401 - fail here, at build time, if unusable

        self.tile_size, self.eps2d, self.near, self.far, self.background = tile_size, eps2d, near, far, background

    def forward(self, gaussians: Gaussians, cameras: Cameras) -> RenderOutput:
        from gsplat import rasterization

        if gaussians.is_packed:
            raise ShapeError("gaussians: the rasterizer takes the dense layout (B, N); render a packed batch with GaussianRasterizer or recon3d.render.render (per object)")
        if len(cameras.batch_shape) != 2 or cameras.batch_shape[0] != gaussians.batch_size:
            raise ShapeError(f"cameras: expected batch shape (B={gaussians.batch_size}, V), got {list(cameras.batch_shape)}")
        B, V = cameras.batch_shape
        bg = make_background(self.background, (V,), gaussians.means.device, gaussians.means.dtype)
        outs = []
        for b in range(B):  # a loop over scenes (B is small), never over Gaussians
            g = gaussians[b]
            colors = g.colors[0]
            img, alpha, meta = rasterization(
                g.means[0], g.quats[0], g.scales[0], g.opacities[0], colors,
                viewmats=cameras.w2c[b], Ks=cameras.K[b], width=cameras.width, height=cameras.height,
                near_plane=self.near, far_plane=self.far, eps2d=self.eps2d, tile_size=self.tile_size,
                sh_degree=g.sh_degree, render_mode="RGB+ED", backgrounds=None, packed=False,
                camera_model="ortho" if cameras.is_orthographic else "pinhole",  # gsplat's ortho: u = fx x + cx, as ours
            )
            outs.append((img, alpha, meta))
        rgb = torch.stack([o[0][..., :3] for o in outs]).permute(0, 1, 4, 2, 3)
        depth = torch.stack([o[0][..., 3:4] for o in outs]).permute(0, 1, 4, 2, 3)
        alpha = torch.stack([o[1] for o in outs]).permute(0, 1, 4, 2, 3)
        rgb = rgb + (1 - alpha) * bg[None, :, :, None, None]
        depth = torch.where(alpha > 1e-6, depth, torch.zeros_like(depth))
        means2d = torch.cat([o[2]["means2d"] for o in outs]).reshape(B * V, -1, 2)
        radii = torch.cat([o[2]["radii"] for o in outs]).reshape(B * V, gaussians.num_gaussians, -1).amax(-1)
        return RenderOutput(rgb, alpha, depth, extras={"means2d": means2d, "radii": radii})
