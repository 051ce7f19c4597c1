"""nvdiffrast backend for mesh rasterization (CUDA; imported lazily).

Conversion at this edge: OpenCV camera points ``(x, y, z)`` go to clip space with
``x_c = (2 fx / W) x + (2 cx / W - 1) z``, ``y_c = (2 fy / H) y + (2 cy / H - 1) z``, ``w_c = z``.
Keeping image-down ``y`` as clip ``+y`` makes nvdiffrast's row 0 (clip ``y = -1``) image row 0,
so no flip is needed; the mirrored winding does not matter because nvdiffrast does not cull.
Orthographic cameras: ``x_c = (2 fx / W) x + 2 cx / W - 1`` (likewise ``y``), ``w_c = 1``, and
``z_c`` the same linear map of ``z`` onto ``[-1, 1]``; depth is then recovered from ``z_c``.
"""

from __future__ import annotations

import torch
from torch import nn

from recon3d.data.cameras import Cameras
from recon3d.errors import BackendUnavailableError, ShapeError
from recon3d.render.mesh.torch_rasterizer import Fragments

__all__ = ["NvdiffrastMeshRasterizer", "opencv_to_clip"]


def opencv_to_clip(verts: torch.Tensor, cameras: Cameras, near: float, far: float) -> torch.Tensor:
    """World ``verts (B, Nv, 3)`` → clip coordinates ``(B, V, Nv, 4)`` (module docstring)."""
    w2c = cameras.w2c.to(verts.dtype)
    p = torch.einsum("bvij,bnj->bvni", w2c[..., :3, :3], verts) + w2c[:, :, None, :3, 3]
    x, y, z = p.unbind(-1)
    K = cameras.K.to(verts.dtype)
    W, H = cameras.width, cameras.height
    xc = (2 * K[..., 0, 0, None] / W) * x + (2 * K[..., 0, 2, None] / W - 1) * z
    yc = (2 * K[..., 1, 1, None] / H) * y + (2 * K[..., 1, 2, None] / H - 1) * z
    zc = (far + near) / (far - near) * z - 2 * far * near / (far - near)
    if cameras.is_orthographic:  # affine: w_c = 1, z_c linear in z
        xc = (2 * K[..., 0, 0, None] / W) * x + (2 * K[..., 0, 2, None] / W - 1)
        yc = (2 * K[..., 1, 1, None] / H) * y + (2 * K[..., 1, 2, None] / H - 1)
        return torch.stack([xc, yc, (2 * z - far - near) / (far - near), torch.ones_like(z)], -1)
    return torch.stack([xc, yc, zc, z], -1)


class NvdiffrastMeshRasterizer(nn.Module):
    """``nvdiffrast.torch`` rasterize / interpolate / antialias with :class:`TorchMeshRasterizer`'s outputs.

    ``soft_mask`` is the antialiased coverage (nvdiffrast's analytic AA of the hard mask), which
    carries the silhouette gradients to vertex positions.
    """

    def __init__(self, sigma: float = 0.0, near: float = 1e-3, far: float = 100.0, antialias: bool = True):
        super().__init__()
        try:
            import nvdiffrast.torch as dr
        except Exception as err:  # noqa: BLE001
            raise BackendUnavailableError(f"mesh rasterizer backend 'nvdiffrast' unusable: {err}") from err
        self._dr = dr
        self._ctx = None
        self.near, self.far, self.antialias, self.sigma = near, far, antialias, sigma

    def forward(self, verts: torch.Tensor, faces: torch.Tensor, cameras: Cameras) -> Fragments:
        dr = self._dr
        if self._ctx is None:
            self._ctx = dr.RasterizeCudaContext(device=verts.device)
        if len(cameras.batch_shape) != 2 or cameras.batch_shape[0] != verts.shape[0]:
            raise ShapeError(f"cameras: expected batch shape (B={verts.shape[0]}, V), got {list(cameras.batch_shape)}")
        B, V = cameras.batch_shape
        H, W = cameras.height, cameras.width
        clip = opencv_to_clip(verts, cameras, self.near, self.far).reshape(B * V, -1, 4).float().contiguous()
        tri = faces.int().contiguous()
        rast, _ = dr.rasterize(self._ctx, clip, tri, resolution=(H, W))
        fid = rast[..., 3].long() - 1
        covered = fid >= 0
        u, v = rast[..., 0], rast[..., 1]
        # nvdiffrast's (u, v) weight vertices 0 and 1; interpolate() already corrects for perspective.
        bary = torch.stack([u, v, 1 - u - v], -1) * covered[..., None]
        zcam = clip[..., 3:4].contiguous()
        if cameras.is_orthographic:  # w_c is 1 there: camera z from the linear z_c
            zcam = (0.5 * (clip[..., 2:3] * (self.far - self.near) + self.far + self.near)).contiguous()
        depth, _ = dr.interpolate(zcam, rast, tri)
        depth = depth[..., 0] * covered
        mask = covered.to(verts.dtype)
        soft = None
        if self.antialias:
            soft = dr.antialias(mask[..., None].contiguous(), rast, clip, tri)[..., 0].reshape(B, V, 1, H, W)
        return Fragments(
            face_ids=fid.reshape(B, V, H, W),
            bary=bary.reshape(B, V, H, W, 3).to(verts.dtype),
            depth=depth.reshape(B, V, 1, H, W).to(verts.dtype),
            mask=mask.reshape(B, V, 1, H, W),
            soft_mask=soft,
            faces=faces.long(),
        )
