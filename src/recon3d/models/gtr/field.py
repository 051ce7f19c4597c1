"""GTR's NeRF field on a triplane: two separate MLPs for density and colour."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from recon3d.errors import ConfigError
from recon3d.render.triplane import sample_triplane
from recon3d.utils.checks import check_shape

__all__ = ["FieldMLP", "TriplaneField"]

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "softplus": nn.Softplus}


class FieldMLP(nn.Module):
    """``num_layers`` linear layers ``in -> hidden -> ... -> out`` with an activation between them.

    No activation after the last layer. Weights are xavier-uniform, biases zero (GTR's init).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, activation: str = "gelu"):
        super().__init__()
        if num_layers < 1:
            raise ConfigError(f"num_layers: expected >= 1, got {num_layers}")
        if activation not in _ACTIVATIONS:
            raise ConfigError(f"activation: expected one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = _ACTIVATIONS[activation]()
        for layer in self.layers:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_dim) -> (..., out_dim)``."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return x


class TriplaneField(nn.Module):
    """Density and colour at world points from a triplane, with separate MLPs ``f_d`` and ``f_c``.

    Points in the box ``aabb`` are looked up bilinearly in the xy, xz, yz planes
    (:func:`~recon3d.render.triplane.sample_triplane`, ``padding_mode="border"``), the three
    ``C``-channel features concatenated to ``3C`` in the **interleaved** layout (channel
    ``c*3 + p``, what GTR's released MLPs expect), and fed to

    - ``density_mlp`` (``density_layers`` linear layers) -> softplus -> density ``(B, N)``;
    - ``color_mlp`` (``color_layers`` linear layers) -> ``sigmoid * (1 + 2e) - e`` with
      ``e = color_saturation`` -> rgb ``(B, N, 3)``.

    Separate MLPs let one stage train colour with density frozen (texture refinement) or the
    reverse (:meth:`set_trainable`).

    Every method takes an optional ``views`` argument, the input views a pixel-aligned subclass
    reads (:class:`~recon3d.models.gtr.pixel_field.PixelAlignedTriplaneField`); this field
    depends on the triplane only and ignores it (:attr:`needs_views` is False).

    Paper vs official code: the paper (§4.1) uses 3- and 4-layer MLPs of hidden size **512**
    (the default here); the released checkpoint uses hidden size **32**
    (``config_texrefine.yaml``: ``layer_width: 32``; use ``hidden_dim=32`` to load it). Both use
    GELU and xavier-uniform init; the softplus density and the ``1e-3`` colour saturation come
    from the official code (the paper does not state them).

    Args:
        plane_channels: ``C``; the MLP input is ``3C``.
        hidden_dim: hidden width of both MLPs.
        density_layers / color_layers: number of linear layers of each MLP.
        activation: hidden activation (``"gelu"``).
        color_saturation: ``e`` above (``0`` = plain sigmoid).
        aabb: ``(lo, hi)`` of the cube the triplane spans (GTR: ``[-1, 1]``).
        layout: ``"interleaved"`` (GTR) or ``"plane_major"`` channel order.
        padding_mode: ``grid_sample`` padding outside the box (GTR: ``"border"``).
    """

    #: whether the field reads the input views besides the triplane (pixel-aligned fields)
    needs_views: bool = False

    def __init__(
        self,
        plane_channels: int = 40,
        hidden_dim: int = 512,
        density_layers: int = 3,
        color_layers: int = 4,
        activation: str = "gelu",
        color_saturation: float = 1e-3,
        aabb: tuple[float, float] = (-1.0, 1.0),
        layout: Literal["interleaved", "plane_major"] = "interleaved",
        padding_mode: Literal["border", "zeros", "reflection"] = "border",
    ):
        super().__init__()
        self.plane_channels = int(plane_channels)
        self.color_saturation = float(color_saturation)
        self.aabb = (float(aabb[0]), float(aabb[1]))
        self.layout, self.padding_mode = layout, padding_mode
        in_dim = 3 * self.plane_channels
        self.density_mlp = FieldMLP(in_dim, hidden_dim, 1, density_layers, activation)
        self.color_mlp = FieldMLP(in_dim, hidden_dim, 3, color_layers, activation)

    def features(self, planes: torch.Tensor, points: torch.Tensor, views=None) -> torch.Tensor:
        """Triplane features ``(B, N, 3C)`` at ``points (B, N, 3)`` from ``planes (B, 3, C, R, R)``
        (``views`` is not read: class docstring)."""
        dims = check_shape(planes, f"B 3 {self.plane_channels} R R", "planes")
        check_shape(points, "B N 3", "points", {"B": dims["B"]})
        return sample_triplane(planes, points, aabb=self.aabb, layout=self.layout, padding_mode=self.padding_mode)

    def density_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        """``(..., 3C) -> (...)`` non-negative density."""
        return nn.functional.softplus(self.density_mlp(feats)[..., 0])

    def color_from_features(self, feats: torch.Tensor, color_mlp: nn.Module | None = None) -> torch.Tensor:
        """``(..., 3C) -> (..., 3)`` colour in ``[-e, 1 + e]``; ``color_mlp`` replaces
        :attr:`color_mlp` (texture refinement optimises a copy of it)."""
        e = self.color_saturation
        return torch.sigmoid((self.color_mlp if color_mlp is None else color_mlp)(feats)) * (1 + 2 * e) - e

    def density(self, planes: torch.Tensor, points: torch.Tensor, views=None) -> torch.Tensor:
        """Density ``(B, N)`` only (mesh extraction, free-space losses)."""
        return self.density_from_features(self.features(planes, points, views))

    def color(self, planes: torch.Tensor, points: torch.Tensor, views=None) -> torch.Tensor:
        """Colour ``(B, N, 3)`` only (mesh surface shading, texture refinement)."""
        return self.color_from_features(self.features(planes, points, views))

    def forward(self, planes: torch.Tensor, points: torch.Tensor, views=None) -> dict[str, torch.Tensor]:
        """``planes (B, 3, C, R, R)``, ``points (B, N, 3)`` -> ``{"density": (B, N), "rgb": (B, N, 3)}``."""
        feats = self.features(planes, points, views)
        return {"density": self.density_from_features(feats), "rgb": self.color_from_features(feats)}

    def set_trainable(self, density: bool | None = None, color: bool | None = None) -> None:
        """Freeze (``False``) or unfreeze (``True``) either MLP; ``None`` leaves it as it is."""
        if density is not None:
            self.density_mlp.requires_grad_(density)
        if color is not None:
            self.color_mlp.requires_grad_(color)
