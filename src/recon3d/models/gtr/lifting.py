"""Projected feature lifting: per-view image features onto a triplane through the known cameras.

Not part of GTR's paper (an option of :class:`~recon3d.models.gtr.TriplaneGenerator`, off by
default). Pixel-aligned methods (PixelNeRF, MVS-style volumes) read, for a 3-D point, the image
features under its projection in every input view. A triplane cell is not a point but a line
through the box perpendicular to its plane, so this module samples ``depth_samples`` points on
that line, projects each into every view, samples the view's feature map bilinearly, reduces over
the views (mean and variance: agreement across views is the multi-view cue of where the surface
is) and mixes the per-depth statistics into one feature per cell with a ``Linear`` layer.

Shapes: feature maps ``(B, V, C_in, h, w)`` with cameras of batch ``(B, V)`` and size ``w x h``
(for a patch encoder, the input cameras :meth:`~recon3d.data.cameras.Cameras.resized` to the
patch grid: cell ``(i, j)`` of the map is the patch whose centre is pixel ``(j + 0.5, i + 0.5)``
of the grid); output ``(B, 3, C_out, R, R)`` in the triplane layout of
:mod:`recon3d.render.triplane` (planes xy, xz, yz; plane axis ``a`` along the width, ``b`` along
the height, cell centres at ``lo + (k + 0.5) (hi - lo) / R``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from recon3d.data.cameras import Cameras
from recon3d.errors import ConfigError, ShapeError
from recon3d.render.triplane import PLANE_AXES
from recon3d.utils.checks import check_shape

__all__ = ["ProjectedFeatureLifting", "plane_line_points", "sample_views"]


def plane_line_points(resolution: int, depth_samples: int, aabb: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """World points on the line through every triplane cell: ``(3, R, R, K, 3)``.

    Entry ``[p, i, j, k]`` lies in plane ``p``'s cell at row ``i`` (the plane's second axis) and
    column ``j`` (its first axis), at the ``k``-th of ``K`` evenly spaced bin centres along the
    third axis; all coordinates are cell/bin centres of the box ``aabb``.
    """
    lo, hi = float(aabb[0]), float(aabb[1])
    R, K = int(resolution), int(depth_samples)
    cell = lo + (torch.arange(R, dtype=torch.float32) + 0.5) * (hi - lo) / R
    depth = lo + (torch.arange(K, dtype=torch.float32) + 0.5) * (hi - lo) / K
    out = torch.empty(3, R, R, K, 3)
    for p, (a, b) in enumerate(PLANE_AXES):
        c = 3 - a - b  # the perpendicular axis
        out[p, :, :, :, a] = cell[None, :, None]
        out[p, :, :, :, b] = cell[:, None, None]
        out[p, :, :, :, c] = depth[None, None, :]
    return out


def sample_views(feature_maps: torch.Tensor, cameras: Cameras, points: torch.Tensor,
                 padding: Literal["zeros", "border"] = "zeros") -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear samples of each view's feature map under the projection of world points.

    Args:
        feature_maps: ``(B, V, C, h, w)``.
        cameras: batch ``(B, V)``, size ``w x h`` (pixel ``(u, v)`` covers ``[u, u+1) x [v, v+1)``).
        points: ``(N, 3)`` world points shared by all objects, or ``(B, N, 3)``.
        padding: what the bilinear weights read beyond the border pixels' centres (a valid point
            within half a pixel of the edge): ``"zeros"`` (``grid_sample``'s default, a fade to 0)
            or ``"border"`` (the border pixel: colours keep their value up to the edge).

    Returns:
        ``feats (B, V, N, C)`` (zero where invalid) and ``valid (B, V, N)``: the point is in front
        of the camera and projects inside the image.
    """
    feats, valid = _sample_channels_first(feature_maps, cameras, points, padding)
    return feats.transpose(2, 3), valid


def _project(cameras: Cameras, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``u, v, z`` each ``(B, V, N)`` of points ``(N, 3)`` or ``(B, N, 3)`` in cameras ``(B, V)``.

    Perspective cameras take one matrix product with ``P = K [R | t]`` (the lifting projects
    ~10^6 points per step, where :meth:`Cameras.project`'s broadcast over ``(B, V, N, 3)`` costs
    several times more); orthographic ones go through :meth:`Cameras.project`.
    """
    B, V = cameras.batch_shape
    if cameras.is_orthographic:
        pts = (points if points.dim() == 3 else points[None].expand(B, -1, -1))[:, None].expand(B, V, -1, 3)
        uv, z = cameras.project(pts.to(cameras.c2w))
        return uv[..., 0], uv[..., 1], z
    P = cameras.K @ cameras.w2c[..., :3, :]  # B V 3 4
    homog = torch.cat([points, torch.ones_like(points[..., :1])], -1).to(P)
    if points.dim() == 2:
        uvw = (homog @ P.reshape(B * V * 3, 4).T).T.reshape(B, V, 3, -1)  # one GEMM for every view
    else:
        uvw = torch.einsum("bnk,bvjk->bvjn", homog, P)
    z = uvw[:, :, 2]
    zc = z.clamp_min(1e-8)
    return uvw[:, :, 0] / zc, uvw[:, :, 1] / zc, z


#: feature maps of at most this many cells (``h * w``) are sampled through an interpolation matrix
#: (:func:`_bilinear_by_matrix`) instead of ``grid_sample``: same values, and the gradient with
#: respect to the maps is one batched GEMM, where CPU ``grid_sample``'s backward scatters point by
#: point (the patch-grid token maps of the GTR demo are 8 x 8: ~4x faster forward + backward).
MATRIX_SAMPLING_MAX_CELLS = 256
#: ... and only while the dense ``(B V, N, h w)`` weight matrix stays this small (2^25 floats,
#: 128 MB in float32): small images lifted onto a large output triplane go through grid_sample.
MATRIX_SAMPLING_MAX_ELEMENTS = 1 << 25


def _bilinear_by_matrix(maps: torch.Tensor, u: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, h: int, w: int,
                        padding: str = "zeros") -> torch.Tensor:
    """``grid_sample(..., bilinear, zeros | border, align_corners=False)`` as a matrix product.

    Args:
        maps: ``(M, C, h*w)`` flattened feature maps.
        u, v: ``(M, N)`` pixel coordinates (pixel ``(j, i)`` covers ``[j, j+1) x [i, i+1)``).
        valid: ``(M, N)``; invalid points sample 0.

    Returns ``(M, C, N)``. The ``(M, N, h*w)`` matrix holds each point's four bilinear weights;
    corners outside the map get weight 0 (zeros padding) or go to the nearest border cell
    (border padding), as in ``grid_sample``.
    """
    x, y = u - 0.5, v - 0.5  # continuous coordinates of the cell centres
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = (x - x0).to(maps.dtype), (y - y0).to(maps.dtype)
    x0, y0 = x0.long(), y0.long()
    M, N = u.shape
    weights = maps.new_zeros(M, N, h * w)
    for dx, dy, wt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        inside = valid if padding == "border" else valid & (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1))[..., None]
        weights.scatter_add_(2, idx, torch.where(inside, wt, 0.0)[..., None])
    return maps @ weights.transpose(1, 2)


def _sample_channels_first(feature_maps: torch.Tensor, cameras: Cameras, points: torch.Tensor,
                           padding: str = "zeros") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_views` with features ``(B, V, C, N)`` (grid_sample's own layout)."""
    if padding not in ("zeros", "border"):
        raise ConfigError(f"padding: expected 'zeros' or 'border', got {padding!r}")
    dims = check_shape(feature_maps, "B V C h w", "feature_maps")
    B, V, C, h, w = (dims[k] for k in ("B", "V", "C", "h", "w"))
    if tuple(cameras.batch_shape) != (B, V) or (cameras.width, cameras.height) != (w, h):
        raise ShapeError(
            f"cameras: expected batch [{B}, {V}] and size {w}x{h} to match feature_maps, got "
            f"{list(cameras.batch_shape)} and {cameras.width}x{cameras.height}"
        )
    if points.dim() == 3:
        check_shape(points, "B N 3", "points", {"B": B})
    else:
        check_shape(points, "N 3", "points")
    u, v, z = _project(cameras, points)
    valid = (z > 1e-6) & (u >= 0) & (u <= w) & (v >= 0) & (v <= h)
    if h * w <= MATRIX_SAMPLING_MAX_CELLS and B * V * u.shape[-1] * h * w <= MATRIX_SAMPLING_MAX_ELEMENTS:
        feats = _bilinear_by_matrix(feature_maps.reshape(B * V, C, h * w), u.reshape(B * V, -1), v.reshape(B * V, -1),
                                    valid.reshape(B * V, -1), h, w, padding)
        return feats.reshape(B, V, C, -1), valid
    # grid_sample(align_corners=False): -1 and +1 are the outer edges of the border pixels;
    # an invalid point is sent off the image, where zeros padding gives 0.
    gx = torch.where(valid, u * (2.0 / w) - 1, 2.0)
    gy = torch.where(valid, v * (2.0 / h) - 1, 2.0)
    grid = torch.stack([gx, gy], -1).reshape(B * V, 1, -1, 2).to(feature_maps.dtype)
    feats = F.grid_sample(feature_maps.reshape(B * V, C, h, w), grid, mode="bilinear", padding_mode=padding,
                          align_corners=False)  # B*V, C, 1, N
    feats = feats.reshape(B, V, C, -1)
    return (feats * valid[:, :, None].to(feats.dtype) if padding == "border" else feats), valid


class ProjectedFeatureLifting(nn.Module):
    """Image features lifted onto a triplane through the input cameras (module docstring).

    ``forward(feature_maps (B, V, C_in, h, w), cameras (B, V)) -> (B, 3, C_out, R, R)``. Per cell:
    ``K`` line points, per point the valid-view mean and variance of the sampled features
    (``2 C_in`` values; zeros where no view sees the point), concatenated over the line
    (``2 K C_in``), layer-normed and mapped by ``Linear(2 K C_in -> C_out)`` or, with
    ``hidden_dim``, by ``Linear(2 K C_in -> hidden) -> GELU -> Linear(hidden -> C_out)`` (a
    non-linear read of the line, e.g. where along it every view sees the object).

    Args:
        in_channels: ``C_in`` of the feature maps.
        out_channels: ``C_out`` of the lifted planes.
        resolution: ``R``, cells per plane side.
        depth_samples: ``K``, points per cell line (default ``R``).
        aabb: ``(lo, hi)`` of the cube the triplane spans (the field's box).
        hidden_dim: width of the optional hidden layer (None: one linear layer).
    """

    def __init__(self, in_channels: int, out_channels: int, resolution: int, depth_samples: int | None = None,
                 aabb: tuple[float, float] = (-1.0, 1.0), hidden_dim: int | None = None):
        super().__init__()
        K = int(resolution if depth_samples is None else depth_samples)
        if int(resolution) < 1 or K < 1 or int(in_channels) < 1 or int(out_channels) < 1:
            raise ConfigError(
                f"ProjectedFeatureLifting: expected positive in_channels, out_channels, resolution, depth_samples; got "
                f"{in_channels}, {out_channels}, {resolution}, {depth_samples}"
            )
        if hidden_dim is not None and int(hidden_dim) < 1:
            raise ConfigError(f"ProjectedFeatureLifting: hidden_dim: expected a positive int or None, got {hidden_dim}")
        if not float(aabb[1]) > float(aabb[0]):
            raise ConfigError(f"aabb: expected lo < hi, got {tuple(aabb)}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.resolution, self.depth_samples = int(resolution), K
        self.aabb = (float(aabb[0]), float(aabb[1]))
        self.register_buffer("points", plane_line_points(self.resolution, K, self.aabb).reshape(-1, 3), persistent=False)
        self.norm = nn.LayerNorm(2 * K * self.in_channels)
        n_in = 2 * K * self.in_channels
        self.proj = (nn.Linear(n_in, self.out_channels) if hidden_dim is None else
                     nn.Sequential(nn.Linear(n_in, int(hidden_dim)), nn.GELU(), nn.Linear(int(hidden_dim), self.out_channels)))

    def statistics(self, feature_maps: torch.Tensor, cameras: Cameras) -> torch.Tensor:
        """Valid-view mean and variance at every line point: ``(B, 3, R, R, K, 2 C_in)``."""
        B = feature_maps.shape[0]
        feats, valid = _sample_channels_first(feature_maps, cameras, self.points)  # B V C N, B V N
        wgt = valid.to(feats.dtype)[:, :, None]  # B V 1 N
        # Sums over the few views as contiguous per-view slices (a strided reduction over V is
        # several times slower on CPU), taken with unbind: its backward is one stack, where an
        # index per view would allocate and zero-fill a full-size gradient per use. Variance as
        # E[f^2] - mean^2, clamped (features are O(1)).
        s1, s2, n = 0.0, 0.0, 0.0
        for f, m in zip(feats.unbind(1), wgt.unbind(1)):
            fw = f * m
            s1, s2, n = s1 + fw, s2 + fw * f, n + m
        n = n.clamp_min(1.0)  # B 1 N
        mean = s1 / n  # B C N
        var = (s2 / n - mean.square()).clamp_min(0.0)
        R, K = self.resolution, self.depth_samples
        return torch.cat([mean, var], 1).transpose(1, 2).reshape(B, 3, R, R, K, 2 * self.in_channels)

    def forward(self, feature_maps: torch.Tensor, cameras: Cameras) -> torch.Tensor:
        check_shape(feature_maps, f"B V {self.in_channels} h w", "feature_maps")
        s = self.statistics(feature_maps, cameras)
        B, R = s.shape[0], self.resolution
        out = self.proj(self.norm(s.reshape(B, 3, R, R, -1)))  # B 3 R R C_out
        return out.permute(0, 1, 4, 2, 3)
