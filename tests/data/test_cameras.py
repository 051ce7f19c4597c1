"""Camera convention: conversions round-trip, projection agrees with ray generation."""

import math

import pytest
import torch

from recon3d.data import Cameras, camera_rays, look_at, orbit_cameras, plucker_embedding
from recon3d.data.cameras import OPENGL_TO_OPENCV, intrinsics_from_fov
from recon3d.errors import ShapeError


@pytest.fixture
def cams():
    return orbit_cameras(torch.tensor([0.0, 70.0, 200.0]), torch.tensor([10.0, -20.0, 60.0]), torch.tensor([2.0, 2.5, 3.0]), 45.0, 40, 30)


def test_look_at_points_camera_at_target(cams):
    # The principal ray (+z of the camera) passes through the origin.
    z = cams.c2w[:, :3, 2]
    to_origin = torch.nn.functional.normalize(-cams.centers, dim=-1)
    assert torch.allclose(z, to_origin, atol=1e-6)
    # Image "down" (+y) points against world up (+z) for non-vertical cameras.
    assert (cams.c2w[:, 2, 1] < 0).all()


def test_w2c_is_inverse(cams):
    assert torch.allclose(cams.w2c @ cams.c2w, torch.eye(4).expand(3, 4, 4), atol=1e-5)
    again = Cameras.from_w2c(cams.w2c, cams.K, 40, 30)
    assert torch.allclose(again.c2w, cams.c2w, atol=1e-5)


def test_opengl_round_trip_flips_y_and_z(cams):
    gl = cams.to_opengl()
    assert torch.allclose(gl[:, :3, 1], -cams.c2w[:, :3, 1])
    assert torch.allclose(gl[:, :3, 2], -cams.c2w[:, :3, 2])
    assert torch.allclose(Cameras.from_opengl(gl, cams.K, 40, 30).c2w, cams.c2w, atol=1e-6)
    assert torch.equal(OPENGL_TO_OPENCV @ OPENGL_TO_OPENCV, torch.eye(4))


def test_normalized_intrinsics_and_fov(cams):
    n = cams.normalized_intrinsics()
    back = Cameras.from_normalized_intrinsics(cams.c2w, n, 40, 30)
    assert torch.allclose(back.K, cams.K, atol=1e-5)
    assert torch.allclose(cams.fov_y, torch.full((3,), math.radians(45.0)), atol=1e-6)
    K = intrinsics_from_fov(90.0, 64, 64)
    assert K[0, 0].item() == pytest.approx(32.0, rel=1e-6)


def test_project_inverts_rays(cams):
    # A point along the ray of pixel (u, v) at distance t projects back onto (u, v) with the right z.
    pix = torch.tensor([[3.5, 7.5], [20.0, 15.0], [39.5, 0.5]]).expand(3, 3, 2)
    o, d = camera_rays(cams, pix)
    t = torch.tensor([0.7, 1.3, 2.9])[None, :, None]
    uv, z = cams.project(o + t * d)
    assert torch.allclose(uv, pix, atol=1e-4)
    expected_z = (t[..., 0] * (d * cams.c2w[:, None, :3, 2]).sum(-1))
    assert torch.allclose(z, expected_z, atol=1e-5)


def test_resize_and_crop_keep_rays(cams):
    small = cams.resized(20, 15)
    # The centre of pixel (u, v) at full size is (u+0.5)/2 at half size: the same ray.
    o1, d1 = camera_rays(cams, torch.tensor([[[10.0, 8.0]]]).expand(3, 1, 2))
    o2, d2 = camera_rays(small, torch.tensor([[[5.0, 4.0]]]).expand(3, 1, 2))
    assert torch.allclose(d1, d2, atol=1e-6)
    crop = cams.cropped(4, 6, 16, 16)
    o3, d3 = camera_rays(crop, torch.tensor([[[6.0, 2.0]]]).expand(3, 1, 2))
    assert torch.allclose(d1, d3, atol=1e-6)


def test_plucker_conventions(cams):
    m_oxd = plucker_embedding(cams, "oxd", "md")
    m_dxo = plucker_embedding(cams, "dxo", "dm")
    assert m_oxd.shape == (3, 6, 30, 40)
    assert torch.allclose(m_oxd[:, :3], -m_dxo[:, 3:], atol=1e-6)  # moments differ in sign
    assert torch.allclose(m_oxd[:, 3:], m_dxo[:, :3])  # directions identical
    # The moment is independent of where on the line the origin sits: o + s d gives the same o x d.
    o, d = camera_rays(cams)
    assert torch.allclose(torch.linalg.cross(o + 0.37 * d, d), torch.linalg.cross(o, d), atol=1e-5)


def test_bad_cameras_name_the_argument():
    K = intrinsics_from_fov(40.0, 8, 8)
    nan = torch.eye(4)
    nan[0, 3] = float("nan")
    with pytest.raises(ShapeError, match="c2w: expected finite"):
        Cameras(nan, K, 8, 8)
    singular = torch.eye(4)
    singular[2, 2] = 0
    with pytest.raises(ShapeError, match="c2w: expected a rotation"):
        Cameras(singular, K, 8, 8)
    with pytest.raises(ShapeError, match=r"K: expected shape"):
        Cameras(torch.eye(4), torch.eye(4), 8, 8)
    with pytest.raises(ShapeError, match="width/height"):
        Cameras(torch.eye(4), K, 0, 8)
    with pytest.raises(ShapeError, match="batch dims"):
        Cameras(torch.eye(4).expand(2, 4, 4), K.expand(3, 3, 3), 8, 8)


def test_look_at_straight_down_is_finite():
    c2w = look_at(torch.tensor([[0.0, 0.0, 3.0]]))
    assert torch.isfinite(c2w).all()
    assert torch.allclose(c2w[0, :3, 2], torch.tensor([0.0, 0.0, -1.0]))
