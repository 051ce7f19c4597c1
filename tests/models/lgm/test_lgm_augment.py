"""LGM's input augmentations (recon3d.models.lgm.augment): grid distortion and orbit camera jitter."""

from __future__ import annotations

import math

import pytest
import torch

from recon3d.data.cameras import orbit_cameras
from recon3d.errors import ConfigError, ShapeError
from recon3d.models.lgm.augment import augment_input_views, axis_angle_matrix, grid_distortion, orbit_camera_jitter


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n=3, c=3, h=20, w=24, seed=0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=_gen(seed))


# ---------------------------------------------------------------------- grid distortion
def test_grid_distortion_identity_at_strength_zero():
    x = _images()
    for steps in (2, 8, 16):
        y = grid_distortion(x, strength=0.0, num_steps=steps, generator=_gen(1))
        torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def test_grid_distortion_moves_pixels_and_stays_in_range():
    x = _images(n=4)
    y = grid_distortion(x, strength=0.5, generator=_gen(2))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert (y - x).abs().max() > 0.05  # a real warp, not a no-op
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert torch.isfinite(y).all()


def test_grid_distortion_is_a_monotone_remap_of_a_ramp():
    """An x-ramp image (value = pixel-centre x in [0, 1]) warped by a separable monotone remap
    stays increasing along x, keeps its first and last columns near the ends, and moves interior
    columns by at most half a segment (strength 1 with n knots: 0.5 / (n - 1))."""
    W, n = 64, 8
    ramp = ((torch.arange(W) + 0.5) / W).expand(1, 1, 16, W).double().repeat(5, 1, 1, 1)
    y = grid_distortion(ramp, strength=1.0, num_steps=n, generator=_gen(3))
    assert (y[..., 1:] - y[..., :-1] >= -1e-12).all()
    assert (y - ramp).abs().max() <= 0.5 / (n - 1) + 1.0 / W
    # rows are identical: the x warp does not depend on y
    torch.testing.assert_close(y, y[:, :, :1].expand_as(y))


def test_grid_distortion_deterministic_under_a_seed():
    x = _images()
    a = grid_distortion(x, generator=_gen(7))
    b = grid_distortion(x, generator=_gen(7))
    c = grid_distortion(x, generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_grid_distortion_bad_arguments():
    with pytest.raises(ConfigError, match="strength"):
        grid_distortion(_images(), strength=1.5)
    with pytest.raises(ConfigError, match="num_steps"):
        grid_distortion(_images(), num_steps=1)
    with pytest.raises(ShapeError, match="images"):
        grid_distortion(torch.rand(3, 8, 8))


# ---------------------------------------------------------------------- camera jitter
def _orbit(n=6, elevation=0.0, radius=2.8):
    az = torch.linspace(0, 300, n)
    return orbit_cameras(az, torch.full((n,), elevation), radius, 40.0, 16, 16).c2w


def test_axis_angle_matrix_matches_closed_form():
    angle = torch.tensor([0.3, -1.1])
    R = axis_angle_matrix(torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]), angle)
    c, s = math.cos(0.3), math.sin(0.3)
    torch.testing.assert_close(R[0], torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]))
    c, s = math.cos(-1.1), math.sin(-1.1)
    torch.testing.assert_close(R[1], torch.tensor([[1.0, 0, 0], [0, c, -s], [0, s, c]]))


def test_jitter_identity_at_strength_zero():
    c2w = _orbit()
    torch.testing.assert_close(orbit_camera_jitter(c2w, 0.0, _gen(0)), c2w, atol=1e-6, rtol=0)


def test_jitter_keeps_rigid_poses_on_the_orbit_looking_at_the_origin():
    c2w = _orbit(n=50, elevation=20.0).double()
    out = orbit_camera_jitter(c2w, 0.1, _gen(4))
    R = out[:, :3, :3]
    # (the float32 orbit is orthonormal to ~1e-7; the jitter adds only double-precision error)
    torch.testing.assert_close(R.transpose(1, 2) @ R, torch.eye(3, dtype=R.dtype).expand_as(R), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(50, dtype=R.dtype), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 3], c2w[:, 3])  # bottom row stays [0, 0, 0, 1]
    torch.testing.assert_close(out[:, :3, 3].norm(dim=-1), c2w[:, :3, 3].norm(dim=-1))
    # the optical axis (+z, OpenCV) still points from the centre to the origin
    forward, centre = out[:, :3, 2], out[:, :3, 3]
    torch.testing.assert_close(forward, -centre / centre.norm(dim=-1, keepdim=True))
    assert (out - c2w).abs().max() > 1e-2


def test_jitter_ranges_match_lgm():
    """For cameras at elevation 0 around +Z, the camera's up axis is world +Z: the jitter is an
    elevation change of β (|β| <= strength * 90 deg) followed by an azimuth change of α
    (|α| <= strength * 180 deg); both ranges are used to their ends."""
    n = 400
    c2w = _orbit(n=n, elevation=0.0).double()
    out = orbit_camera_jitter(c2w, 0.1, _gen(5))

    def az_el(t):
        return torch.rad2deg(torch.atan2(t[:, 1], t[:, 0])), torch.rad2deg(torch.asin(t[:, 2] / t.norm(dim=-1)))

    az0, el0 = az_el(c2w[:, :3, 3])
    az1, el1 = az_el(out[:, :3, 3])
    d_az = (az1 - az0 + 180) % 360 - 180
    assert el0.abs().max() < 1e-6
    assert el1.abs().max() <= 9.0 + 1e-6 and el1.abs().max() > 8.0
    assert d_az.abs().max() <= 18.0 + 1e-6 and d_az.abs().max() > 16.0


def test_jitter_deterministic_under_a_seed():
    c2w = _orbit()
    a, b = orbit_camera_jitter(c2w, generator=_gen(9)), orbit_camera_jitter(c2w, generator=_gen(9))
    assert torch.equal(a, b)
    assert not torch.equal(a, orbit_camera_jitter(c2w, generator=_gen(10)))


# ---------------------------------------------------------------------- both, per object
def test_augment_input_views_leaves_view_zero_untouched():
    B, V = 3, 4
    imgs = torch.rand(B, V, 3, 16, 16, generator=_gen(0))
    c2w = _orbit(n=B * V).view(B, V, 4, 4)
    out_i, out_c = augment_input_views(imgs, c2w, 1.0, 1.0, generator=_gen(1))
    assert torch.equal(out_i[:, 0], imgs[:, 0]) and torch.equal(out_c[:, 0], c2w[:, 0])
    for b in range(B):
        assert not torch.allclose(out_i[b, 1:], imgs[b, 1:])
        assert not torch.allclose(out_c[b, 1:], c2w[b, 1:])
    assert out_i.min() >= 0 and out_i.max() <= 1
    # the inputs are not modified in place
    assert torch.equal(imgs, torch.rand(B, V, 3, 16, 16, generator=_gen(0)))


def test_augment_input_views_probabilities():
    B, V = 2, 3
    imgs = torch.rand(B, V, 3, 8, 8, generator=_gen(0))
    c2w = _orbit(n=B * V).view(B, V, 4, 4)
    out_i, out_c = augment_input_views(imgs, c2w, 0.0, 0.0, generator=_gen(1))
    assert torch.equal(out_i, imgs) and torch.equal(out_c, c2w)
    # probability 0.5: over many objects about half get each augmentation, decided per object
    B = 200
    imgs = torch.rand(1, V, 3, 8, 8, generator=_gen(0)).expand(B, -1, -1, -1, -1)
    c2w = _orbit(n=V).expand(B, -1, -1, -1)
    out_i, out_c = augment_input_views(imgs, c2w, 0.5, 0.5, generator=_gen(2))
    warped = (out_i != imgs).flatten(1).any(1).float().mean()
    jittered = (out_c != c2w).flatten(1).any(1).float().mean()
    assert 0.35 < warped < 0.65 and 0.35 < jittered < 0.65
    a = augment_input_views(imgs, c2w, 0.5, 0.5, generator=_gen(3))
    b = augment_input_views(imgs, c2w, 0.5, 0.5, generator=_gen(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_augment_input_views_bad_shapes():
    with pytest.raises(ShapeError, match="c2w"):
        augment_input_views(torch.rand(2, 3, 3, 8, 8), torch.eye(4).expand(2, 4, 4, 4))
    with pytest.raises(ConfigError, match="prob_camera_jitter"):
        augment_input_views(torch.rand(1, 2, 3, 8, 8), torch.eye(4).expand(1, 2, 4, 4), 0.5, 2.0)
