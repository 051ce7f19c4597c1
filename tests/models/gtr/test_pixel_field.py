"""PixelAlignedTriplaneField: view features against a float64 hand computation, the visual hull,
the colour gate, points no view sees, and the views travelling with Triplanes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon3d.data.batch import Views
from recon3d.data.cameras import orbit_cameras
from recon3d.errors import ConfigError, ShapeError
from recon3d.models.gtr import PixelAlignedTriplaneField, TriplaneField
from recon3d.models.gtr.pixel_field import PIXEL_FEATURES
from recon3d.models.refiners.texture import _color_fn
from recon3d.representations import Triplanes


def _views(B: int = 2, V: int = 3, H: int = 12, W: int = 10, seed: int = 0) -> Views:
    g = torch.Generator().manual_seed(seed)
    az = torch.tensor([10.0, 130.0, 250.0])[:V].repeat(B, 1) + torch.arange(B)[:, None] * 7.0
    cams = orbit_cameras(az, torch.full((B, V), 20.0), 2.6, 45.0, W, H)
    images = torch.rand(B, V, 3, H, W, generator=g)
    masks = torch.rand(B, V, 1, H, W, generator=g)
    return Views(images, cams, masks)


def _bilinear64(img: np.ndarray, u: float, v: float) -> np.ndarray:
    """``grid_sample(bilinear, border, align_corners=False)`` at pixel coordinates, float64, by hand:
    a coordinate beyond the outer pixel centres is clamped to them."""
    C, H, W = img.shape
    x, y = min(max(u - 0.5, 0.0), W - 1.0), min(max(v - 0.5, 0.0), H - 1.0)
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    out = np.zeros(C)
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            wt = (1 - abs(x - xi)) * (1 - abs(y - yi))
            if wt > 0:
                out += wt * img[:, min(yi, H - 1), min(xi, W - 1)]
    return out


def _reference_view_features(field: PixelAlignedTriplaneField, tri: torch.Tensor, points: torch.Tensor, views: Views):
    """Float64 loops over objects, points and views, projecting with ``Cameras.project``."""
    B, N = points.shape[:2]
    V = views.images.shape[1]
    H, W = views.images.shape[-2:]
    uv, z = views.cameras.to(torch.float64).project(points[:, None].expand(B, V, N, 3).double())
    imgs = torch.cat([views.images, views.masks], 2).double().numpy()
    centres = views.cameras.centers.double().numpy()
    q = field.query_mlp(tri).double().detach().numpy()  # the field's own query (a parameter, not the computation)
    out = np.zeros((B, N, PIXEL_FEATURES))
    for b in range(B):
        for n in range(N):
            x = points[b, n].double().numpy()
            rows = []
            for v in range(V):
                u_, v_ = uv[b, v, n].tolist()
                if z[b, v, n] > 1e-6 and 0 <= u_ <= W and 0 <= v_ <= H:
                    s = _bilinear64(imgs[b, v], u_, v_)
                    d = centres[b, v] - x
                    rows.append((s[:3], s[3], d / np.linalg.norm(d)))
            if not rows:
                out[b, n, 9] = 1.0  # hull 1 where nothing is seen, the rest 0
                continue
            rgb = np.stack([r[0] for r in rows])
            m = np.array([r[1] for r in rows])
            mean = rgb.mean(0)
            xh = x / np.linalg.norm(x)
            keys = np.stack([np.concatenate([r[0], [r[1]], r[2], [r[2] @ xh]]) for r in rows])
            s = keys @ q[b, n]
            w = np.exp(s - s.max())
            w /= w.sum()
            out[b, n] = np.concatenate([w @ rgb, mean, ((rgb - mean) ** 2).mean(0), [m.min()], [m.mean()]])
    return torch.from_numpy(out)


@pytest.mark.parametrize("size", [(12, 10), (24, 20)], ids=["matrix_path", "grid_sample_path"])
def test_view_features_match_a_float64_hand_computation(size):
    from recon3d.models.gtr.lifting import MATRIX_SAMPLING_MAX_CELLS

    torch.manual_seed(0)
    views = _views(H=size[0], W=size[1])
    assert (size[0] * size[1] <= MATRIX_SAMPLING_MAX_CELLS) == (size == (12, 10))
    field = PixelAlignedTriplaneField(plane_channels=4, hidden_dim=8, query_hidden_dim=8)
    # big query weights, so the attention is far from uniform and a wrong key shows
    with torch.no_grad():
        field.query_mlp.layers[-1].weight.mul_(20.0)
    points = torch.rand(2, 40, 3) * 1.8 - 0.9
    points[0, 0] = torch.tensor([0.0, 0.0, 5.0])  # above every camera: far outside the images
    tri = torch.randn(2, 40, 12)
    got = field.view_features(tri, points, views).double()
    ref = _reference_view_features(field, tri, points, views)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    assert got[0, 0].tolist() == [0.0] * 9 + [1.0, 0.0]  # nothing sees it: hull 1, no statistics


def test_visual_hull_carves_density_and_can_be_switched_off():
    torch.manual_seed(1)
    views = _views(B=1)
    planes = torch.randn(1, 3, 4, 8, 8)
    points = torch.rand(1, 64, 3) * 1.6 - 0.8
    carve = PixelAlignedTriplaneField(plane_channels=4, hidden_dim=8)
    keep = PixelAlignedTriplaneField(plane_channels=4, hidden_dim=8, visual_hull=False)
    keep.load_state_dict(carve.state_dict())
    feats = carve.features(planes, points, views)
    hull = feats[..., -2]
    torch.testing.assert_close(carve.density(planes, points, views), keep.density(planes, points, views) * hull)
    # a view whose mask is background everywhere empties the whole box it sees
    empty = Views(views.images, views.cameras, views.masks.clone())
    empty.masks[:, 0] = 0.0
    seen = carve.view_features(feats[..., :12], points, empty)
    cam0 = carve.density(planes, points, empty)
    assert (cam0[seen[..., -2] == 0] == 0).all() and (seen[..., -2] == 0).sum() > 0


def test_colour_gate_copies_the_view_colour():
    views = _views(B=1)
    views.images[:] = torch.tensor([0.2, 0.7, 0.4])[:, None, None]  # every view shows one colour
    field = PixelAlignedTriplaneField(plane_channels=4, hidden_dim=8)
    with torch.no_grad():
        last = field.color_mlp.layers[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([-3.0, 3.0, 0.0, 30.0]))  # gate fully open
    points = torch.rand(1, 32, 3) * 1.2 - 0.6
    rgb = field.color(torch.randn(1, 3, 4, 8, 8), points, views)
    torch.testing.assert_close(rgb, torch.tensor([0.2, 0.7, 0.4]).expand(1, 32, 3), atol=1e-6, rtol=0)
    no_gate = PixelAlignedTriplaneField(plane_channels=4, hidden_dim=8, color_gate=False)
    assert no_gate.color_mlp.layers[-1].out_features == 3


def test_unseen_points_have_finite_gradients():
    views = _views(B=1)
    field = PixelAlignedTriplaneField(plane_channels=4, hidden_dim=8)
    planes = torch.randn(1, 3, 4, 8, 8, requires_grad=True)
    points = torch.tensor([[[0.0, 0.0, 6.0], [0.1, 0.0, 0.0]]])  # the first no view sees
    out = field(planes, points, views)
    (out["density"].sum() + out["rgb"].sum()).backward()
    assert torch.isfinite(planes.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in field.parameters() if p.grad is not None)
    assert field.query_mlp.layers[0].weight.grad.abs().sum() > 0


def test_views_are_required_and_checked():
    field = PixelAlignedTriplaneField(plane_channels=4, hidden_dim=8)
    planes, points = torch.randn(2, 3, 4, 8, 8), torch.rand(2, 5, 3)
    with pytest.raises(ShapeError, match="views"):
        field(planes, points)
    with pytest.raises(ShapeError, match="views.images"):
        field(planes, points, _views(B=3))
    with pytest.raises(ConfigError, match="query_hidden_dim"):
        PixelAlignedTriplaneField(plane_channels=4, query_hidden_dim=0)
    assert field.needs_views and not TriplaneField(plane_channels=4).needs_views


def test_triplanes_slice_and_stack_their_views():
    torch.manual_seed(2)
    views = _views(B=2)
    field = PixelAlignedTriplaneField(plane_channels=4, hidden_dim=8)
    tri = Triplanes(torch.randn(2, 3, 4, 8, 8), field, views=views)
    points = torch.rand(2, 16, 3) * 1.6 - 0.8
    whole = tri(points)
    for j in range(2):
        one = tri[j](points[j : j + 1])
        torch.testing.assert_close(one["rgb"], whole["rgb"][j : j + 1])
        torch.testing.assert_close(one["density"], whole["density"][j : j + 1])
    again = Triplanes.from_list(tri.split())
    assert torch.equal(again.views.images, views.images) and torch.equal(again.views.cameras.c2w, views.cameras.c2w)
    torch.testing.assert_close(again(points)["rgb"], whole["rgb"])
    with pytest.raises(ShapeError, match="views.images"):
        Triplanes(torch.randn(1, 3, 4, 8, 8), field, views=views)


def test_texture_refiner_colour_path_reads_the_views():
    views = _views(B=1)
    field = PixelAlignedTriplaneField(plane_channels=4, hidden_dim=8)
    planes, points = torch.randn(1, 3, 4, 8, 8), torch.rand(1, 10, 3) - 0.5
    fn = _color_fn(field, views)
    torch.testing.assert_close(fn(planes, points, field.color_mlp), field.color(planes, points, views))
