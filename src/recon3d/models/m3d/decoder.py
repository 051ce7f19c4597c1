"""M3D implicit decoder (paper eq. 4, §III-C): per-point features -> SDF, geometry feature, colour.

``F_fusion = MLP(concat(F_vis, F_dge, gamma(x), F_global))`` with ``gamma`` the NeRF positional
encoding of the (canonical) point. The MLP is SSR's: ``num_layers`` Softplus(100) layers of width
``hidden`` with a skip connection of the input, weight normalisation and IDR's geometric
initialisation (the initial SDF is a sphere of radius ``sphere_radius`` whatever the image
features are, because the feature inputs of the first layer start at zero weight).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from recon3d.errors import ConfigError
from recon3d.utils.checks import check_shape

__all__ = ["PositionalEncoding", "ImplicitDecoder", "sample_pixel_features"]


class PositionalEncoding(nn.Module):
    """``x (..., 3)`` -> ``(..., 3 + 3 * 2 * num_freqs)``: ``[x, sin(2^k x), cos(2^k x)]_k`` (NeRF/IDR order)."""

    def __init__(self, num_freqs: int = 6, include_input: bool = True):
        super().__init__()
        self.num_freqs, self.include_input = num_freqs, include_input
        self.register_buffer("freqs", 2.0 ** torch.arange(num_freqs, dtype=torch.float32), persistent=False)
        self.out_dim = (3 if include_input else 0) + 6 * num_freqs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x] if self.include_input else []
        for f in self.freqs:
            parts += [torch.sin(x * f), torch.cos(x * f)]
        return torch.cat(parts, -1)


def sample_pixel_features(features: torch.Tensor, uv: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bilinear features ``(B, N, C)`` at continuous pixels ``uv (B, N, 2)`` of a ``width x height`` image.

    ``features (B, C, h, w)`` may have any resolution covering the image; border padding outside.
    """
    check_shape(uv, "B N 2", "uv")
    grid = torch.stack([uv[..., 0] / width * 2 - 1, uv[..., 1] / height * 2 - 1], -1)[:, :, None]  # (B, N, 1, 2)
    out = F.grid_sample(features, grid.to(features.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    return out[..., 0].transpose(1, 2)


class ImplicitDecoder(nn.Module):
    """SDF + colour MLP conditioned on pixel-aligned and global features.

    Args:
        point_features: channels of the per-point image features (``F_vis``, ``F_dge``, ROI).
        global_features: channels of the per-object vector (global feature + class code).
        multires: positional-encoding frequencies (SSR: 6, giving 39 dims).
        hidden: MLP width (SSR: 256).
        num_layers: hidden layers (SSR: 8).
        skip_in: layers that re-inject the input (SSR: ``(4,)``).
        feature_size: size of the geometry feature returned beside the SDF (for a colour/render net).
        sphere_radius: radius of the initial SDF sphere (geometric init).
        weight_norm: weight-normalise the linear layers.
        color_hidden: width of the colour head.
    """

    def __init__(
        self,
        point_features: int,
        global_features: int,
        multires: int = 6,
        hidden: int = 256,
        num_layers: int = 8,
        skip_in: tuple[int, ...] | list[int] = (4,),
        feature_size: int = 256,
        sphere_radius: float = 0.6,
        weight_norm: bool = True,
        color_hidden: int = 256,
    ):
        super().__init__()
        if num_layers < 2:
            raise ConfigError(f"ImplicitDecoder: num_layers must be >= 2, got {num_layers}")
        self.pe = PositionalEncoding(multires)
        self.point_features, self.global_features, self.feature_size = point_features, global_features, feature_size
        d_in = self.pe.out_dim + point_features + global_features
        self.d_in = d_in
        self.skip_in = tuple(s for s in skip_in if 0 < s < num_layers)
        dims = [d_in] + [hidden] * num_layers + [1 + feature_size]
        self.layers = nn.ModuleList()
        for i in range(len(dims) - 1):
            out_dim = dims[i + 1] - d_in if (i + 1) in self.skip_in else dims[i + 1]
            lin = nn.Linear(dims[i], out_dim)
            self._geometric_init(lin, i, len(dims) - 2, sphere_radius, d_in)
            if weight_norm:
                lin = nn.utils.parametrizations.weight_norm(lin)
            self.layers.append(lin)
        self.act = nn.Softplus(beta=100)
        self.color = nn.Sequential(nn.Linear(feature_size + 3, color_hidden), nn.ReLU(), nn.Linear(color_hidden, 3))

    def _geometric_init(self, lin: nn.Linear, i: int, last: int, radius: float, d_in: int) -> None:
        out_dim, in_dim = lin.weight.shape
        with torch.no_grad():
            if i == last:
                nn.init.normal_(lin.weight, mean=math.sqrt(math.pi) / math.sqrt(in_dim), std=1e-4)
                nn.init.constant_(lin.bias, -radius)
            elif i == 0:
                nn.init.constant_(lin.bias, 0.0)
                nn.init.constant_(lin.weight, 0.0)
                nn.init.normal_(lin.weight[:, :3], 0.0, math.sqrt(2) / math.sqrt(out_dim))
            elif i in self.skip_in:
                nn.init.constant_(lin.bias, 0.0)
                nn.init.normal_(lin.weight, 0.0, math.sqrt(2) / math.sqrt(out_dim))
                nn.init.constant_(lin.weight[:, -(d_in - 3):], 0.0)
            else:
                nn.init.constant_(lin.bias, 0.0)
                nn.init.normal_(lin.weight, 0.0, math.sqrt(2) / math.sqrt(out_dim))

    def forward(
        self, points: torch.Tensor, point_features: torch.Tensor, global_features: torch.Tensor, view_dirs: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Decode per-point SDF and colour.

        Args:
            points: ``(B, N, 3)`` canonical point coordinates (positionally encoded).
            point_features: ``(B, N, point_features)``.
            global_features: ``(B, global_features)``.
            view_dirs: optional ``(B, N, 3)`` unit viewing directions for the colour head
                (zeros when None).

        Returns:
            dict ``sdf (B, N)``, ``feature (B, N, feature_size)``, ``rgb (B, N, 3)`` in [0, 1].
        """
        dims: dict = {}
        check_shape(points, "B N 3", "points", dims)
        check_shape(point_features, f"B N {self.point_features}", "point_features", dims)
        check_shape(global_features, f"B {self.global_features}", "global_features", dims)
        g = global_features[:, None].expand(-1, points.shape[1], -1)
        inp = torch.cat([self.pe(points), point_features, g], -1)
        x = inp
        last = len(self.layers) - 1
        for i, lin in enumerate(self.layers):
            if i in self.skip_in:
                x = torch.cat([x, inp], -1) / np.sqrt(2)
            x = lin(x)
            if i < last:
                x = self.act(x)
        sdf, feat = x[..., 0], x[..., 1:]
        vd = torch.zeros_like(points) if view_dirs is None else view_dirs
        rgb = torch.sigmoid(self.color(torch.cat([feat, vd], -1)))
        return {"sdf": sdf, "feature": feat, "rgb": rgb}
