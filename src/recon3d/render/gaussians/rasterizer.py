"""Backend-selecting Gaussian rasterizer: the one a method builds."""

from __future__ import annotations

import torch
from torch import nn

from recon3d.data.cameras import Cameras
from recon3d.errors import ShapeError
from recon3d.render.backends import resolve_backend
from recon3d.render.gaussians.model import Gaussians
from recon3d.render.gaussians.torch_rasterizer import TorchGaussianRasterizer
from recon3d.render.volume import make_background
from recon3d.representations.render_output import RenderOutput

__all__ = ["GaussianRasterizer", "empty_render"]


class GaussianRasterizer(nn.Module):
    """Rasterize :class:`Gaussians` with ``backend: auto | torch | gsplat`` (chosen here, once).

    Args:
        backend: see :mod:`recon3d.render.backends`.
        device: where the Gaussians will live (``"auto"`` only picks gsplat for CUDA).
        **kwargs: ``tile_size``, ``eps2d``, ``near``, ``far``, ``background`` (shared by both
            backends) and the torch backend's ``chunk`` / ``checkpoint_chunks``.

    Forward: ``(gaussians, cameras (B, V))`` → :class:`RenderOutput` ``rgb (B, V, 3, H, W)``,
    ``alpha``, ``depth`` ``(B, V, 1, H, W)`` and extras ``means2d (B*V, N, 2)``, ``radii (B*V, N)``.
    A packed (ragged) batch is rendered one object at a time (an object with no Gaussians renders
    the background, alpha and depth 0); its extras are then per-object lists.
    """

    def __init__(self, backend: str = "auto", device: torch.device | str | None = "cpu", **kwargs):
        super().__init__()
        self.backend = resolve_backend(backend, "gsplat", device, what="gaussian rasterizer")
        if self.backend == "gsplat":
            from recon3d.render.gaussians.gsplat_rasterizer import GsplatGaussianRasterizer

            kwargs.pop("chunk", None)
            kwargs.pop("checkpoint_chunks", None)
            self.impl = GsplatGaussianRasterizer(**kwargs)
        else:
            self.impl = TorchGaussianRasterizer(**kwargs)

    def forward(self, gaussians: Gaussians, cameras: Cameras) -> RenderOutput:
        if not gaussians.is_packed:
            return self.impl(gaussians, cameras)
        if len(cameras.batch_shape) != 2 or cameras.batch_shape[0] != gaussians.batch_size:
            raise ShapeError(f"cameras: expected batch shape (B={gaussians.batch_size}, V), got {list(cameras.batch_shape)}")
        parts = []
        for b, g in enumerate(gaussians.split()):
            cams = cameras[b : b + 1]
            if int(g.counts[0]) == 0:
                out = empty_render(cams, self.impl.background, g.means.device, g.means.dtype)
                V = cams.batch_shape[1]
                out.extras = {"means2d": g.means.new_zeros(V, 0, 2), "radii": g.means.new_zeros(V, 0)}
                parts.append(out)
            else:
                parts.append(self.impl(g.to_dense(), cams))
        return RenderOutput.cat(parts)


def empty_render(cameras: Cameras, background, device, dtype) -> RenderOutput:
    """What an empty scene renders into ``cameras (B, V)``: the background, alpha and depth 0."""
    B, V = cameras.batch_shape
    H, W = cameras.height, cameras.width
    bg = make_background(background, (B, V), device, dtype)  # B V 3
    zeros = torch.zeros(B, V, 1, H, W, device=device, dtype=dtype)
    return RenderOutput(bg[..., None, None].expand(B, V, 3, H, W).clone(), zeros, zeros.clone())
