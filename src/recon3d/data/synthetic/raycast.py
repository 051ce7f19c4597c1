"""Sphere tracing of analytic SDF objects: exact RGBA, z-depth, normals and masks.

Shading is Lambertian under two fixed **world-space** lights plus ambient, so a surface point
has the same colour from every view (the radiance is view-independent, as the reconstruction
methods assume).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recon3d.data.cameras import Cameras
from recon3d.data.rays import camera_rays
from recon3d.data.synthetic.shapes import SyntheticObject

__all__ = ["RenderedViews", "render_sdf_views", "shade"]

_KEY_LIGHT = torch.nn.functional.normalize(torch.tensor([0.4, 0.3, 0.85]), dim=0)
_FILL_LIGHT = torch.nn.functional.normalize(torch.tensor([-0.5, -0.4, -0.3]), dim=0)


@dataclass
class RenderedViews:
    """Unbatched renders of one object: ``rgb (V,3,H,W)`` (0 off the object), ``alpha (V,1,H,W)``,
    ``depth (V,1,H,W)`` (z-depth, 0 off the object), ``normals (V,3,H,W)`` (world, 0 off)."""

    rgb: torch.Tensor
    alpha: torch.Tensor
    depth: torch.Tensor
    normals: torch.Tensor


def shade(albedo: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """View-independent Lambertian shading ``(..., 3)`` of ``albedo`` with world ``normals``."""
    k = (normals @ _KEY_LIGHT.to(normals)).clamp_min(0)
    f = (normals @ _FILL_LIGHT.to(normals)).clamp_min(0)
    return (albedo * (0.35 + 0.5 * k + 0.15 * f)[..., None]).clamp(0, 1)


def _sphere_interval(o: torch.Tensor, d: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b = (o * d).sum(-1)
    c = (o * o).sum(-1) - radius * radius
    disc = b * b - c
    hit = disc > 0
    s = disc.clamp_min(0).sqrt()
    return hit, (-b - s).clamp_min(0), -b + s


def render_sdf_views(
    obj: SyntheticObject,
    cameras: Cameras,
    max_steps: int = 96,
    eps: float = 2e-4,
    chunk: int = 1 << 20,
) -> RenderedViews:
    """Render ``obj`` from ``cameras`` (batch ``(V,)``) by sphere tracing.

    Only rays that enter the object's bounding sphere are traced, and converged or escaped
    rays leave the active set at each step, so cost scales with the object's screen area.
    """
    V, H, W = cameras.batch_shape[0], cameras.height, cameras.width
    o, d = camera_rays(cameras)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    fwd = cameras.c2w[:, :3, 2].repeat_interleave(H * W, 0)
    R = o.shape[0]
    t_hit = torch.zeros(R)
    hit = torch.zeros(R, dtype=torch.bool)
    in_sphere, t0, t1 = _sphere_interval(o, d, obj.bounding_radius() + 1e-2)
    for start in range(0, R, chunk):
        sl = slice(start, min(R, start + chunk))
        idx = torch.nonzero(in_sphere[sl]).squeeze(1) + start
        t = t0[idx].clone()
        for _ in range(max_steps):
            if idx.numel() == 0:
                break
            dist = obj.sdf(o[idx] + t[:, None] * d[idx])
            done = dist.abs() < eps * (1 + t)
            hit[idx[done]] = True
            t_hit[idx[done]] = t[done]
            # CSG distances are bounds, not exact: step a little short to avoid tunnelling.
            t = t + 0.95 * dist
            keep = ~done & (t < t1[idx]) & (t > 0)
            idx, t = idx[keep], t[keep]
    p = o[hit] + t_hit[hit, None] * d[hit]
    n = obj.normal(p)
    rgb = torch.zeros(R, 3)
    rgb[hit] = shade(obj.albedo(p), n)
    normals = torch.zeros(R, 3)
    normals[hit] = n
    depth = torch.zeros(R)
    depth[hit] = t_hit[hit] * (d[hit] * fwd[hit]).sum(-1)
    img = lambda x, c: x.reshape(V, H, W, c).permute(0, 3, 1, 2).contiguous()
    return RenderedViews(img(rgb, 3), img(hit.float()[:, None], 1), img(depth[:, None], 1), img(normals, 3))
