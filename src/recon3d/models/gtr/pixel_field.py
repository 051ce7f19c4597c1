"""A triplane field that also reads the input views under each point (pixel-aligned features).

**Not part of GTR** (an alternative ``field`` of :class:`~recon3d.methods.gtr.GTRModule`, used by
``configs/gtr_demo.yaml``; GTR's own field is :class:`~recon3d.models.gtr.field.TriplaneField`).
At CPU scale (< 1k steps, a 0.8M-parameter network) the triplane alone learns shape but hardly
any colour: the held-out renders of the demo stayed grey however the schedule was tuned. Like
PixelNeRF and IBRNet, this field looks up, for every 3-D point, the input pixels it projects to,
so colour and silhouette come from the images directly and the triplane only has to say *which*
view sees the point and how to correct it:

- **view attention for colour**: per view ``v`` the sampled ``rgb_v``, mask ``m_v``, the unit
  direction ``d_v`` from the point to camera ``v``, ``d_v . x_hat`` (``x_hat``: the point's
  direction from the box centre, a normal proxy for roughly convex objects) form a key ``k_v``
  (8 numbers, constants of the data); the point's triplane feature gives a query ``q`` (a small
  MLP); ``w = softmax_v(q . k_v)`` over the views that see the point, and the blended colour
  ``sum_v w_v rgb_v`` is one of the field's features. The score is linear in the key, so it can
  express "the view facing the surface" (``q`` along the normal) or "the view of this colour"
  without a per-view hidden layer (a GELU over every point and view, the first prototype's
  costliest addition); a part common to every view
  (e.g. ``rgb_v - mean`` instead of ``rgb_v``) would change nothing, softmax being blind to it;
- **view statistics**: the mean and variance of ``rgb_v`` over the views, the smallest mask value
  over the views (the visual hull: 0 once any view sees background there) and the mean mask;
- the density and colour MLPs read ``[triplane features (3C), blended rgb, mean rgb, variance
  rgb, hull, mean mask]`` (``3C + 11``);
- ``visual_hull``: density is multiplied by the hull value (space carving: nothing outside the
  input silhouettes, no floaters in the views' free space);
- ``color_gate``: the colour MLP has a 4th output ``g`` and the colour is ``sigmoid(g) *
  blended + (1 - sigmoid(g)) * mlp_rgb`` (copying an input pixel needs no learning).

A view "sees" a point when the point is in front of its camera and projects inside its image;
occlusion is not modelled (the attention learns it where the triplane knows the shape). A point
no view sees gets hull 1 (nothing is known there) and zero view statistics.

The field needs the input views at every call: :attr:`needs_views` is True, and every method
takes ``views`` (a :class:`~recon3d.data.batch.Views` of batch ``(B, V)`` with images
``(B, V, 3, H, W)``, optional masks ``(B, V, 1, H, W)``, cameras ``(B, V)``).
:class:`~recon3d.representations.Triplanes` carries them beside the planes, so rendering, mesh
export and texture refinement read the same views.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from recon3d.data.batch import Views
from recon3d.errors import ConfigError, ShapeError
from recon3d.models.gtr.field import FieldMLP, TriplaneField
from recon3d.models.gtr.lifting import sample_views
from recon3d.utils.checks import check_shape

__all__ = ["PixelAlignedTriplaneField", "PIXEL_FEATURES", "VIEW_KEY_DIM"]

#: numbers a point gets from the views: blended rgb 3, mean rgb 3, variance rgb 3, hull 1, mean mask 1
PIXEL_FEATURES = 11
#: length of a view's attention key: rgb 3, mask 1, direction to the camera 3, its dot with x_hat 1
VIEW_KEY_DIM = 8
_BLEND, _HULL = slice(-11, -8), -2  # where the blended rgb and the hull sit in the feature vector


class PixelAlignedTriplaneField(TriplaneField):
    """Triplane field plus pixel-aligned view features (module docstring).

    Args:
        plane_channels, hidden_dim, density_layers, color_layers, activation, color_saturation,
            aabb, layout, padding_mode: as :class:`~recon3d.models.gtr.field.TriplaneField`
            (the MLPs read ``3C + 11`` numbers; the colour MLP has 4 outputs with ``color_gate``).
        query_hidden_dim: hidden width of the 2-layer query MLP ``3C -> hidden -> 8``.
        visual_hull: multiply density by the visual-hull value (module docstring).
        color_gate: blend the view-attention colour with the MLP's colour by a learned gate.
    """

    needs_views = True

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
        query_hidden_dim: int = 32,
        visual_hull: bool = True,
        color_gate: bool = True,
    ):
        super().__init__(plane_channels, hidden_dim, density_layers, color_layers, activation, color_saturation, aabb,
                         layout, padding_mode)
        if int(query_hidden_dim) < 1:
            raise ConfigError(f"PixelAlignedTriplaneField: query_hidden_dim: expected a positive int, got {query_hidden_dim}")
        self.visual_hull, self.color_gate = bool(visual_hull), bool(color_gate)
        in_dim = 3 * self.plane_channels + PIXEL_FEATURES
        self.density_mlp = FieldMLP(in_dim, hidden_dim, 1, density_layers, activation)
        self.color_mlp = FieldMLP(in_dim, hidden_dim, 4 if self.color_gate else 3, color_layers, activation)
        self.query_mlp = FieldMLP(3 * self.plane_channels, int(query_hidden_dim), VIEW_KEY_DIM, 2, activation)

    # ------------------------------------------------------------------ view features
    def view_features(self, tri: torch.Tensor, points: torch.Tensor, views: Views) -> torch.Tensor:
        """The ``PIXEL_FEATURES`` numbers of every point: ``(B, N, 11)``.

        Args:
            tri: ``(B, N, 3C)`` triplane features of the points (the attention's query).
            points: ``(B, N, 3)`` world points.
            views: input views of batch ``(B, V)`` (module docstring).
        """
        rgbm = self._rgbm(views, tri.shape[0])
        # border padding: a point within half a pixel of an image edge reads the edge pixel, not a fade to 0
        s, valid = sample_views(rgbm, views.cameras, points, padding="border")  # B V N 4, B V N
        # Views are handled as V contiguous (B, N, ...) slices and stacked last: reductions over a
        # strided V axis are several times slower on CPU (as in recon3d.models.gtr.lifting).
        s = s.transpose(1, 2)  # B N V 4
        valid = valid.transpose(1, 2)  # B N V
        rgb, m = s[..., :3], s[..., 3]
        vis = valid.to(s.dtype)
        n = vis.sum(-1, keepdim=True).clamp_min(1.0)  # B N 1
        mean = (rgb * vis[..., None]).sum(2) / n  # B N 3
        var = ((rgb - mean[:, :, None]).square() * vis[..., None]).sum(2) / n
        hull = torch.where(valid, m, torch.ones_like(m)).amin(-1, keepdim=True)
        mean_mask = (m * vis).sum(-1, keepdim=True) / n
        centre = 0.5 * (self.aabb[0] + self.aabb[1])
        to_cam = F.normalize(views.cameras.centers.to(points)[:, None] - points[:, :, None], dim=-1)  # B N V 3
        x_hat = F.normalize(points - centre, dim=-1)[:, :, None]
        keys = torch.cat([rgb, m[..., None], to_cam, (to_cam * x_hat).sum(-1, keepdim=True)], -1)  # B N V 8
        score = (keys * self.query_mlp(tri)[:, :, None]).sum(-1)  # B N V
        # The dtype's lowest finite value, not -inf: a point no view sees gets equal finite weights
        # (then zeroed by vis) instead of softmax's NaN, whose backward would poison the query MLP.
        score = score.masked_fill(~valid, torch.finfo(score.dtype).min)
        w = torch.softmax(score, -1) * vis
        blended = (w[..., None] * rgb).sum(2)
        return torch.cat([blended, mean, var, hull, mean_mask], -1)

    def _rgbm(self, views: Views | None, batch: int) -> torch.Tensor:
        """``(B, V, 4, H, W)`` rgb + mask of the views (mask 1 where the views have none)."""
        if views is None or views.cameras is None:
            raise ShapeError("views: PixelAlignedTriplaneField reads the input views (images, masks, cameras) at every "
                             "point; got " + ("None" if views is None else "views without cameras"))
        dims = check_shape(views.images, f"{batch} V 3 H W", "views.images")
        masks = views.masks
        if masks is None:
            masks = torch.ones_like(views.images[:, :, :1])
        else:
            check_shape(masks, f"{batch} {dims['V']} 1 {dims['H']} {dims['W']}", "views.masks")
        return torch.cat([views.images, masks.to(views.images)], 2)

    # ------------------------------------------------------------------ TriplaneField interface
    def features(self, planes: torch.Tensor, points: torch.Tensor, views: Views | None = None) -> torch.Tensor:
        """``(B, N, 3C + 11)``: triplane features, then :meth:`view_features`."""
        tri = super().features(planes, points)
        return torch.cat([tri, self.view_features(tri, points, views)], -1)

    def density_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Softplus density, times the visual hull with ``visual_hull``."""
        density = super().density_from_features(feats)
        return density * feats[..., _HULL] if self.visual_hull else density

    def color_from_features(self, feats: torch.Tensor, color_mlp: nn.Module | None = None) -> torch.Tensor:
        """The MLP's colour in ``[-e, 1 + e]``, gated with the blended view colour (``color_gate``)."""
        out = (self.color_mlp if color_mlp is None else color_mlp)(feats)
        e = self.color_saturation
        rgb = torch.sigmoid(out[..., :3]) * (1 + 2 * e) - e
        if not self.color_gate:
            return rgb
        g = torch.sigmoid(out[..., 3:])
        return g * feats[..., _BLEND] + (1 - g) * rgb
