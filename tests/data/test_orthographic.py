"""Orthographic cameras (issue 14 item 4): projection, unprojection and rays against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from recon3d.data import Cameras, camera_rays, look_at
from recon3d.data.cameras import orthographic_intrinsics
from recon3d.errors import ShapeError


def _ortho(eye, extent: float, size: int = 32, target=(0.0, 0.0, 0.0)) -> Cameras:
    """One orthographic camera at ``eye`` whose square image spans ``extent`` world units."""
    c2w = look_at(torch.tensor(eye, dtype=torch.float32)[None], torch.tensor(target)[None])
    K = orthographic_intrinsics(extent, size, size)[None]
    return Cameras(c2w, K, size, size, projection="orthographic")


def test_point_projects_without_perspective_division():
    # Camera at (0, 0, -5) looking along world +z (identity rotation): a camera-frame point is the
    # world point shifted by 5 in z, and orthographic pixels are fx x + cx, fy y + cy.
    c2w = torch.eye(4)
    c2w[2, 3] = -5.0
    K = torch.tensor([[10.0, 0, 16.0], [0, 12.0, 15.0], [0, 0, 1]])
    cams = Cameras(c2w[None], K[None], 32, 30, projection="orthographic")
    pts = torch.tensor([[[0.3, -0.2, 1.0], [0.3, -0.2, 4.0], [-1.1, 0.7, 0.0]]])
    uv, z = cams.project(pts)
    want_uv = torch.stack([10.0 * pts[..., 0] + 16.0, 12.0 * pts[..., 1] + 15.0], -1)
    assert torch.allclose(uv, want_uv, atol=1e-5)
    assert torch.allclose(z, pts[..., 2] + 5.0, atol=1e-5)
    # Depth along the view axis does not move an orthographic point in the image.
    assert torch.allclose(uv[0, 0], uv[0, 1])


def test_projection_of_rotated_camera_matches_float64_reference():
    g = torch.Generator().manual_seed(3)
    eye = torch.randn(4, 3, generator=g, dtype=torch.float64) * 3
    c2w = look_at(eye.float())
    K = torch.tensor([[7.0, 0, 11.0], [0, 9.0, 13.0], [0, 0, 1]]).expand(4, 3, 3)
    cams = Cameras(c2w, K, 24, 26, projection="orthographic")
    pts = torch.randn(4, 5, 3, generator=g, dtype=torch.float64)
    R, t = c2w[:, :3, :3].double(), c2w[:, :3, 3].double()
    cam = torch.einsum("bji,bnj->bni", R, pts - t[:, None])  # R^T (p - t)
    want = torch.stack([7.0 * cam[..., 0] + 11.0, 9.0 * cam[..., 1] + 13.0], -1)
    uv, z = cams.project(pts.float())
    assert torch.allclose(uv.double(), want, atol=1e-4)
    assert torch.allclose(z.double(), cam[..., 2], atol=1e-5)


@pytest.mark.parametrize("projection", ["perspective", "orthographic"])
def test_unproject_inverts_project(projection):
    c2w = look_at(torch.tensor([[2.0, -3.0, 1.5], [0.0, 2.5, 0.5]]))
    K = torch.tensor([[20.0, 0, 16.0], [0, 18.0, 12.0], [0, 0, 1]]).expand(2, 3, 3)
    cams = Cameras(c2w, K, 32, 24, projection=projection)
    pts = torch.tensor([[[0.1, 0.2, -0.3], [0.5, -0.4, 0.2]], [[-0.3, 0.0, 0.6], [0.0, 0.0, 0.0]]])
    uv, z = cams.project(pts)
    assert torch.allclose(cams.unproject(uv, z), pts, atol=1e-5)


def test_rays_are_parallel_to_the_view_axis_with_origins_on_the_image_plane():
    cams = _ortho([2.0, -3.0, 1.0], extent=2.5, size=16)
    o, d = camera_rays(cams)  # (1, H, W, 3)
    axis = cams.c2w[0, :3, 2]
    assert torch.allclose(d, axis.expand_as(d), atol=1e-6)
    # Origins lie on the plane through the camera centre perpendicular to the axis ...
    assert torch.allclose(((o - cams.centers[0]) * axis).sum(-1), torch.zeros(1, 16, 16), atol=1e-5)
    # ... spaced one pixel = 1 / fx world units apart along the camera's x and y axes.
    step_u = o[0, 0, 1] - o[0, 0, 0]
    assert torch.allclose(step_u, cams.c2w[0, :3, 0] / cams.K[0, 0, 0], atol=1e-6)
    # And each origin projects back onto its own pixel centre at depth 0.
    pix = torch.tensor([[[0.5, 0.5], [7.5, 3.5], [15.5, 15.5]]])
    o2, _ = camera_rays(cams, pix)
    uv, z = cams.project(o2)
    assert torch.allclose(uv, pix, atol=1e-4) and torch.allclose(z, torch.zeros(1, 3), atol=1e-5)


def _sphere_pixels(cams: Cameras, radius: float) -> int:
    """Pixels whose ray meets a sphere of ``radius`` at the origin (exact ray-sphere test)."""
    o, d = camera_rays(cams)
    t = -(o * d).sum(-1)  # closest approach along the unit ray
    closest = o + t[..., None] * d
    return int((closest.norm(dim=-1) < radius).sum())


def test_sphere_silhouette_radius_is_scale_times_radius_at_any_distance():
    size, extent, r = 64, 3.0, 0.8  # the image spans 3 world units: 64/3 px per unit
    px_per_unit = size / extent
    counts = []
    for dist in (2.0, 6.0, 40.0):
        cams = _ortho([dist, 0.0, 0.0], extent=extent, size=size)
        n = _sphere_pixels(cams, r)
        counts.append(n)
        # Disc of radius s r pixels: area pi (s r)^2, within the pixelisation of its rim.
        want = math.pi * (px_per_unit * r) ** 2
        assert abs(n - want) < 2 * math.pi * px_per_unit * r * 0.5, (dist, n, want)
        # The sphere's outline projects to a circle of radius s r around the image centre.
        phi = torch.linspace(0, 2 * math.pi, 50)
        x, y = cams.c2w[0, :3, 0], cams.c2w[0, :3, 1]
        rim = r * (torch.cos(phi)[:, None] * x + torch.sin(phi)[:, None] * y)
        uv, _ = cams.project(rim[None])
        rad = (uv[0] - torch.tensor([size / 2, size / 2])).norm(dim=-1)
        assert torch.allclose(rad, torch.full_like(rad, px_per_unit * r), atol=1e-3)
    assert len(set(counts)) == 1, counts  # the distance to the camera does not change the silhouette


def test_perspective_silhouette_follows_the_tangent_cone():
    # Contrast with the pinhole closed form: the tangent cone's half-angle is asin(r / D).
    size, r, f = 64, 0.5, 40.0
    K = torch.tensor([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1]])[None]
    for dist in (2.0, 4.0):
        cams = Cameras(look_at(torch.tensor([[dist, 0.0, 0.0]])), K, size, size)
        n = _sphere_pixels(cams, r)
        rad = f * math.tan(math.asin(r / dist))
        assert abs(n - math.pi * rad**2) < 2 * math.pi * rad * 0.5, (dist, n)


def test_resize_keeps_world_extent_of_orthographic_rays():
    cams = _ortho([0.0, -4.0, 0.0], extent=2.0, size=32)
    small = cams.resized(16, 16)
    assert small.projection == "orthographic"
    o1, d1 = camera_rays(cams, torch.tensor([[[10.0, 8.0]]]))
    o2, d2 = camera_rays(small, torch.tensor([[[5.0, 4.0]]]))
    assert torch.allclose(o1, o2, atol=1e-6) and torch.allclose(d1, d2)


def test_projection_field_checked_and_kept():
    cams = _ortho([0.0, -4.0, 0.0], extent=2.0)
    for derived in (cams[0:1], cams.to(torch.float64), cams.reshape(1, 1), Cameras.stack([cams, cams]), cams.cropped(1, 1, 8, 8)):
        assert derived.projection == "orthographic"
    with pytest.raises(ShapeError, match="projection"):
        Cameras(cams.c2w, cams.K, 32, 32, projection="fisheye")
    with pytest.raises(ShapeError, match="one projection"):
        Cameras.stack([cams, Cameras(cams.c2w, cams.K, 32, 32)])
    with pytest.raises(ShapeError, match="orthographic"):
        _ = cams.fov_y
