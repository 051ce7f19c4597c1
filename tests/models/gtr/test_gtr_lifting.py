"""Projected feature lifting (GTR generator option): projection against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from recon3d.data.cameras import Cameras, orbit_cameras
from recon3d.errors import ConfigError, ShapeError
from recon3d.models.encoders import ConvPatchEncoder
from recon3d.models.gtr import (
    GTRNetwork,
    ProjectedFeatureLifting,
    TriplaneField,
    TriplaneGenerator,
    plane_line_points,
    sample_views,
)


def _camera_on_minus_z(w: int = 8, h: int = 8, f: float = 10.0) -> Cameras:
    """One camera at (0, 0, -3) looking along +z with OpenCV axes (identity rotation)."""
    c2w = torch.eye(4)
    c2w[2, 3] = -3.0
    K = torch.tensor([[f, 0.0, w / 2], [0.0, f, h / 2], [0.0, 0.0, 1.0]])
    return Cameras(c2w[None, None], K[None, None], w, h)


def _coordinate_maps(w: int = 8, h: int = 8) -> torch.Tensor:
    """``(1, 1, 2, h, w)``: channel 0 is each pixel centre's u, channel 1 its v."""
    v, u = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    return torch.stack([u, v])[None, None].float()


def test_plane_line_points_are_cell_and_bin_centres():
    pts = plane_line_points(4, 2, (-1.0, 1.0))
    assert pts.shape == (3, 4, 4, 2, 3)
    centres = [-0.75, -0.25, 0.25, 0.75]
    # xz plane (index 1), row i = z, column j = x, line along y with bin centres -0.5, 0.5.
    assert pts[1, 2, 0, 1].tolist() == [centres[0], 0.5, centres[2]]
    # yz plane: column = y, row = z, line along x.
    assert pts[2, 3, 1, 0].tolist() == [-0.5, centres[1], centres[3]]


def test_sample_views_lands_on_the_hand_projected_pixel():
    cams = _camera_on_minus_z()
    # (0.6, -0.3, 0) is at camera depth 3: u = 10 * 0.6 / 3 + 4 = 6, v = 10 * -0.3 / 3 + 4 = 3.
    # (0.3, 0.45, 1) is at depth 4: u = 10 * 0.3 / 4 + 4 = 4.75, v = 10 * 0.45 / 4 + 4 = 5.125.
    points = torch.tensor([[0.6, -0.3, 0.0], [0.3, 0.45, 1.0], [0.0, 0.0, -4.0], [5.0, 0.0, 0.0]])
    feats, valid = sample_views(_coordinate_maps(), cams, points)
    assert feats.shape == (1, 1, 4, 2) and valid.shape == (1, 1, 4)
    # Bilinear interpolation of a linear ramp between pixel centres returns the coordinate itself.
    torch.testing.assert_close(feats[0, 0, 0], torch.tensor([6.0, 3.0]))
    torch.testing.assert_close(feats[0, 0, 1], torch.tensor([4.75, 5.125]))
    # Behind the camera and off the image: invalid, zero features.
    assert valid[0, 0].tolist() == [True, True, False, False]
    assert feats[0, 0, 2:].abs().max() == 0


def test_view_statistics_match_a_float64_pinhole_reference():
    torch.manual_seed(0)
    w = h = 16
    cams = orbit_cameras(torch.tensor([0.0, 120.0]), torch.tensor([10.0, 30.0]), 5.0, 70.0, w, h).reshape(1, 2)
    maps = torch.rand(1, 2, 3, h, w)
    lift = ProjectedFeatureLifting(3, 5, resolution=4, depth_samples=3)
    stats = lift.statistics(maps, cams)  # 1 3 4 4 3 6
    # Reference: pinhole projection in float64 with the pose inverted by hand, manual bilinear.
    pts = plane_line_points(4, 3).reshape(-1, 3).double()
    per_view = []
    for v in range(2):
        c2w = cams.c2w[0, v].double()
        R, t = c2w[:3, :3], c2w[:3, 3]
        cam = (pts - t) @ R  # R^T (p - t)
        K = cams.K[0, v].double()
        u = K[0, 0] * cam[:, 0] / cam[:, 2] + K[0, 2] - 0.5
        s = K[1, 1] * cam[:, 1] / cam[:, 2] + K[1, 2] - 0.5
        img = maps[0, v].double()
        vals = []
        for x, y in zip(u.tolist(), s.tolist()):
            x0, y0 = math.floor(x), math.floor(y)
            acc = torch.zeros(3, dtype=torch.float64)
            for dx in (0, 1):
                for dy in (0, 1):
                    xi, yi = x0 + dx, y0 + dy
                    wgt = (1 - abs(x - xi)) * (1 - abs(y - yi))
                    if 0 <= xi < w and 0 <= yi < h:
                        acc += wgt * img[:, yi, xi]
            vals.append(acc)
        inside = (u >= -0.5) & (u <= w - 0.5) & (s >= -0.5) & (s <= h - 0.5) & (cam[:, 2] > 0)
        assert inside.all()  # the whole box is in view of both cameras
        per_view.append(torch.stack(vals))
    f = torch.stack(per_view)  # 2 N 3
    ref = torch.cat([f.mean(0), f.var(0, unbiased=False)], -1).reshape(3, 4, 4, 3, 6)
    torch.testing.assert_close(stats[0].double(), ref, atol=1e-5, rtol=1e-5)


def _generator(**kw) -> TriplaneGenerator:
    return TriplaneGenerator(width=16, num_layers=1, num_heads=2, head_dim=8, plane_resolution=4, plane_channels=6,
                             upsample_factor=2, **kw)


@pytest.mark.parametrize("hidden", [None, 8])
def test_generator_option_off_by_default_and_on_trains_its_lifting(hidden):
    assert not _generator().needs_cameras
    assert not any("lifting" in k for k in _generator().state_dict())  # paper default: official weights' keys only
    torch.manual_seed(0)
    net = GTRNetwork(ConvPatchEncoder(width=16, patch_size=8), _generator(lift_tokens=True, lift_pixels=True, lift_hidden_dim=hidden),
                     TriplaneField(plane_channels=6, hidden_dim=8))
    cams = orbit_cameras(torch.tensor([0.0, 90.0, 180.0]), torch.full((3,), 20.0), 2.5, 40.0, 32, 16).reshape(1, 3)
    images = torch.rand(1, 3, 3, 16, 32)
    planes = net.triplanes(images, torch.ones(1, 3, 1, 16, 32), cams)
    assert planes.shape == (1, 3, 6, 8, 8)
    planes.square().mean().backward()
    for lifting in (net.generator.token_lifting, net.generator.pixel_lifting):
        first = lifting.proj if hidden is None else lifting.proj[0]
        assert first.weight.grad.abs().sum() > 0
    with pytest.raises(ShapeError, match="^cameras"):
        net.generator(torch.zeros(1, 24, 16))


def test_lifting_errors_name_the_argument():
    with pytest.raises(ConfigError, match="lift_aabb"):
        GTRNetwork(ConvPatchEncoder(width=16), _generator(lift_tokens=True, lift_aabb=(-0.5, 0.5)),
                   TriplaneField(plane_channels=6, hidden_dim=8))
    with pytest.raises(ConfigError, match="ProjectedFeatureLifting"):
        ProjectedFeatureLifting(3, 4, resolution=0)
    with pytest.raises(ShapeError, match="^cameras"):
        sample_views(torch.zeros(1, 1, 2, 8, 8), _camera_on_minus_z(4, 4), torch.zeros(2, 3))


@pytest.mark.parametrize("size", [(8, 8), (5, 7)])
def test_matrix_sampling_equals_grid_sample_forward_and_gradient(size, monkeypatch):
    """Small maps go through the interpolation-matrix path; grid_sample (the large-map path)
    is the reference, values and the gradient with respect to the maps, border cells included."""
    from recon3d.models.gtr import lifting

    h, w = size
    g = torch.Generator().manual_seed(0)
    cams = orbit_cameras(torch.tensor([0.0, 100.0, 230.0]), torch.tensor([0.0, 20.0, -10.0]), 2.5, 50.0, w, h)
    cams = Cameras(cams.c2w[None], cams.K[None], w, h)
    maps = torch.randn(1, 3, 5, h, w, generator=g, dtype=torch.float64)
    points = torch.rand(400, 3, generator=g, dtype=torch.float64) * 2.4 - 1.2  # some project off the image
    weights = torch.randn(1, 3, 5, 400, generator=g, dtype=torch.float64)
    outs = {}
    for name, limit in (("matrix", 10_000), ("grid_sample", 0)):
        monkeypatch.setattr(lifting, "MATRIX_SAMPLING_MAX_CELLS", limit)
        m = maps.clone().requires_grad_(True)
        feats, valid = lifting._sample_channels_first(m, cams.to(torch.float64), points)
        (feats * weights).sum().backward()
        outs[name] = (feats.detach(), m.grad, valid)
    assert 0 < int(outs["matrix"][2].sum()) < outs["matrix"][2].numel()  # both valid and invalid points
    torch.testing.assert_close(outs["matrix"][0], outs["grid_sample"][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(outs["matrix"][1], outs["grid_sample"][1], rtol=0, atol=1e-12)
    assert torch.equal(outs["matrix"][2], outs["grid_sample"][2])


def test_matrix_sampling_is_bounded_by_the_weight_matrix_size(monkeypatch):
    """Few cells but many points: past MATRIX_SAMPLING_MAX_ELEMENTS the dense weights are not built."""
    from recon3d.models.gtr import lifting

    cams = orbit_cameras(torch.tensor([0.0]), torch.tensor([0.0]), 2.5, 50.0, 4, 4)
    cams = Cameras(cams.c2w[None], cams.K[None], 4, 4)
    calls = []
    real = lifting._bilinear_by_matrix
    monkeypatch.setattr(lifting, "_bilinear_by_matrix", lambda *a: calls.append(1) or real(*a))
    pts = torch.zeros(100, 3)
    lifting._sample_channels_first(torch.ones(1, 1, 2, 4, 4), cams, pts)
    assert calls == [1]  # 1 * 100 * 16 weights: within the bound
    monkeypatch.setattr(lifting, "MATRIX_SAMPLING_MAX_ELEMENTS", 100 * 16 - 1)
    feats, _ = lifting._sample_channels_first(torch.ones(1, 1, 2, 4, 4), cams, pts)
    assert calls == [1] and torch.allclose(feats, torch.ones_like(feats))  # grid_sample took it
