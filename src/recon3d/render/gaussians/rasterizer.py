"""Backend-selecting Gaussian rasterizer: the one a method builds."""

from __future__ import annotations

import torch
from torch import nn

from recon3d.data.cameras import Cameras
from recon3d.render.backends import resolve_backend
from recon3d.render.gaussians.model import Gaussians
from recon3d.render.gaussians.torch_rasterizer import TorchGaussianRasterizer

__all__ = ["GaussianRasterizer"]


class GaussianRasterizer(nn.Module):
    """Rasterize :class:`Gaussians` with ``backend: auto | torch | gsplat`` (chosen here, once).

    Args:
        backend: see :mod:`recon3d.render.backends`.
        device: where the Gaussians will live (``"auto"`` only picks gsplat for CUDA).
        **kwargs: ``tile_size``, ``eps2d``, ``near``, ``far``, ``background`` (shared by both
            backends) and the torch backend's ``chunk`` / ``checkpoint_chunks``.

    Forward: ``(gaussians, cameras (B, V))`` → dict ``rgb (B, V, 3, H, W)``, ``alpha``, ``depth``
    ``(B, V, 1, H, W)``, ``means2d (B*V, N, 2)``, ``radii (B*V, N)``.
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

    def forward(self, gaussians: Gaussians, cameras: Cameras) -> dict[str, torch.Tensor]:
        return self.impl(gaussians, cameras)
