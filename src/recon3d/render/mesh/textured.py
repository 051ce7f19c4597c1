"""Render a :class:`~recon3d.data.mesh_assets.TexturedMesh` (textured, multi-material asset) to
RGBA, z-depth and world normals through :class:`~recon3d.render.mesh.MeshRasterizer`.

Shading is unlit albedo: a pixel's colour is its face-corner colour (material factor, vertex or
face colours) interpolated with perspective-correct barycentrics, times the part's base-colour
texture at the interpolated UV (:func:`~recon3d.render.mesh.sample_texture`, bilinear). Unlit
colour is what an evaluation set needs to score appearance independently of a light rig, and it
makes every pixel an analytic function of the asset.

Normals are the interpolated vertex normals, turned to face the camera (a two-sided surface seen
from behind shows its back), in world coordinates, 0 where empty. ``supersample = s`` rasterizes at
``s`` times the size and box-filters down: alpha becomes the pixel's coverage, colour, depth and
normals are coverage-weighted means (colour straight, not premultiplied).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from recon3d.data.cameras import Cameras
from recon3d.data.mesh_assets import TexturedMesh
from recon3d.errors import ConfigError, ShapeError
from recon3d.render.mesh.texture import sample_texture

__all__ = ["TexturedRender", "render_textured_mesh"]


@dataclass
class TexturedRender:
    """``rgb (V, 3, H, W)`` straight colour, ``alpha (V, 1, H, W)``, ``depth (V, 1, H, W)`` z-depth
    (0 where empty), ``normals (V, 3, H, W)`` world unit normals (0 where empty)."""

    rgb: torch.Tensor
    alpha: torch.Tensor
    depth: torch.Tensor
    normals: torch.Tensor


def _shade(mesh: TexturedMesh, frags, cameras: Cameras, face_part: torch.Tensor, textures: list) -> tuple[torch.Tensor, ...]:
    """Per-pixel ``rgb, cov, depth, normals`` (channels-last ``(v, H, W, C)``) of one view chunk."""
    fid = frags.face_ids[0]  # v, H, W
    cov = fid >= 0
    f = fid.clamp_min(0)
    bary = frags.bary[0].to(torch.float32)[..., None]  # v, H, W, 3, 1
    dev = fid.device
    rgb = (bary * mesh.corner_rgb.to(dev)[f]).sum(-2)
    part = face_part[f]
    for p, tex in textures:
        sel = cov & (part == p)
        if not bool(sel.any()):
            continue
        uv = (bary[sel] * mesh.corner_uv.to(dev)[f[sel]]).sum(-2)  # M, 2
        # (1, 1, 2, 1, M): the M selected pixels as one row of one view
        col = sample_texture(tex[None], uv.T[None, None, :, None, :])[0, 0, :, 0].T  # M, 3
        rgb[sel] = rgb[sel] * col
    corners = mesh.faces.to(dev)[f]  # v, H, W, 3
    n = (bary * mesh.vertex_normals.to(dev)[corners]).sum(-2)
    pos = (bary * mesh.verts.to(dev)[corners]).sum(-2)
    view = pos - cameras.centers.to(dev).reshape(-1, 1, 1, 3)
    n = F.normalize(n, dim=-1)
    n = torch.where(((n * view).sum(-1, keepdim=True) > 0), -n, n)
    depth = frags.depth[0, :, 0].to(torch.float32)
    m = cov[..., None].to(torch.float32)
    return rgb * m, m, depth[..., None] * m, n * m


def render_textured_mesh(
    mesh: TexturedMesh,
    cameras: Cameras,
    rasterizer: torch.nn.Module | None = None,
    supersample: int = 1,
    view_batch: int = 8,
) -> TexturedRender:
    """Render ``mesh`` into ``cameras`` ``(V,)`` (module docstring).

    Args:
        rasterizer: a :class:`~recon3d.render.mesh.MeshRasterizer` (default: the torch reference
            on ``cameras``' device); its ``face_ids``/``bary``/``depth`` are used.
        supersample: rasterize at ``supersample`` x the size and box-filter (anti-aliased edges).
        view_batch: views rasterized at once (bounds memory).

    Returns a :class:`TexturedRender` on ``cameras``' device.
    """
    if len(cameras.batch_shape) != 1:
        raise ShapeError(f"cameras: expected batch shape (V,), got {list(cameras.batch_shape)}")
    if supersample < 1 or view_batch < 1:
        raise ConfigError(f"supersample / view_batch: expected >= 1, got {supersample} / {view_batch}")
    if rasterizer is None:
        from recon3d.render.mesh import MeshRasterizer

        rasterizer = MeshRasterizer("torch", device=cameras.device)
    dev = cameras.device
    s = int(supersample)
    W, H = cameras.width, cameras.height
    big = cameras.resized(W * s, H * s) if s > 1 else cameras
    face_part = torch.empty(mesh.num_faces, dtype=torch.long, device=dev)
    textures = []
    for i, p in enumerate(mesh.parts):
        face_part[p.start:p.stop] = i
        if p.texture is not None:
            textures.append((i, p.texture.to(dev, torch.float32)))
    verts, faces = mesh.verts.to(dev)[None], mesh.faces.to(dev)
    outs: list[list[torch.Tensor]] = [[], [], [], []]
    for a in range(0, len(cameras), view_batch):
        cams = big[a:a + view_batch]
        with torch.no_grad():
            frags = rasterizer(verts, faces, cams.reshape(1, len(cams)))
            rgb, cov, depth, n = (x.permute(0, 3, 1, 2) for x in _shade(mesh, frags, cams, face_part, textures))
            if s > 1:
                rgb, cov, depth, n = (F.avg_pool2d(x, s) for x in (rgb, cov, depth, n))
                inv = torch.where(cov > 0, 1 / cov.clamp_min(1e-12), torch.zeros_like(cov))
                rgb, depth = rgb * inv, depth * inv
                n = F.normalize(n, dim=1) * (cov > 0)
        for lst, x in zip(outs, (rgb, cov, depth, n)):
            lst.append(x)
    rgb, alpha, depth, normals = (torch.cat(x) for x in outs)
    return TexturedRender(rgb=rgb.clamp(0, 1), alpha=alpha, depth=depth, normals=normals)
