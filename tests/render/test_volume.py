from __future__ import annotations

import math

import pytest
import torch

from recon3d.data.cameras import Cameras, orbit_cameras
from recon3d.errors import ConfigError, ShapeError
from recon3d.render import (
    LaplaceDensity,
    NeuSDensity,
    VolumeRenderer,
    composite,
    importance_samples,
    ray_aabb,
    stratified_samples,
)
from recon3d.render.sdf_density import laplace_cdf


def test_ray_aabb_values_and_miss():
    o = torch.tensor([[0.0, 0.0, -3.0], [0.0, 5.0, -3.0], [0.0, 0.0, 0.0]])
    d = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    near, far, hit = ray_aabb(o, d, torch.tensor([[-1.0] * 3, [1.0] * 3]))
    assert hit.tolist() == [True, False, True]
    torch.testing.assert_close(near, torch.tensor([2.0, 0.0, 0.0]))
    torch.testing.assert_close(far, torch.tensor([4.0, 0.0, 1.0]))


def test_ray_aabb_bad_shapes():
    with pytest.raises(ShapeError, match="dirs"):
        ray_aabb(torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(2, 3))


def test_samplers_shapes_and_order():
    near, far = torch.zeros(7), torch.ones(7) * 2
    t = stratified_samples(near, far, 16, perturb=True)
    assert t.shape == (7, 16) and (t >= 0).all() and (t <= 2).all() and (t.diff(dim=-1) > 0).all()
    w = torch.zeros(7, 15)
    w[:, 7] = 1.0
    bins = torch.linspace(0, 2, 16).expand(7, 16)
    s = importance_samples(bins, w, 32, perturb=False)
    assert s.shape == (7, 32)
    assert ((s > bins[0, 7] - 1e-5) & (s < bins[0, 8] + 1e-5)).float().mean() > 0.9


def test_composite_weights():
    alphas = torch.tensor([[0.5, 0.5, 1.0]])
    w, acc = composite(alphas, {"v": torch.tensor([[[1.0], [2.0], [3.0]]])})
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.25, 0.25]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(acc["v"], torch.tensor([[0.5 + 0.5 + 0.75]]), atol=1e-6, rtol=0)


def test_laplace_density_is_scaled_cdf():
    dens = LaplaceDensity(0.1, beta_min=0.0, learnable=True)
    s = torch.linspace(-1, 1, 21)
    torch.testing.assert_close(dens(s), laplace_cdf(-s, 0.1) / 0.1)
    dens(s).sum().backward()
    assert dens.raw_beta.grad is not None


def test_neus_alphas_in_range_and_weights_peak_at_surface():
    neus = NeuSDensity(0.3)
    t = torch.linspace(0, 2, 64)
    sdf = 1.0 - t  # surface at t = 1
    a = neus.alphas(sdf[None], torch.full((1, 64), t[1] - t[0]))
    assert (a >= 0).all() and (a <= 1).all()
    w, _ = composite(a, {})
    assert abs(float(t[w[0].argmax()]) - 1.0) < 0.1


def _sphere_field(r=0.5):
    return lambda p: {"sdf": p.norm(dim=-1) - r, "rgb": torch.full_like(p, 0.25)}


def _cams(size=24):
    return orbit_cameras(torch.tensor([0.0, 120.0]), torch.tensor([10.0, -20.0]), 3.0, 30, size, size).reshape(1, 2)


@pytest.mark.parametrize("density", [LaplaceDensity(0.002, learnable=False), NeuSDensity(0.6, learnable=False)])
def test_sphere_depth_normals_and_background(density):
    cams = _cams()
    vr = VolumeRenderer(n_samples=96, n_importance=64, sdf_to_alpha=density, background="white", normals="auto", perturb=False, chunk=300)
    out = vr(_sphere_field(), cams)
    assert out["rgb"].shape == (1, 2, 3, 24, 24) and out["depth"].shape == (1, 2, 1, 24, 24) and out["normal"].shape == (1, 2, 3, 24, 24)
    c = 12  # pixel (12, 12) centre is the image centre + 0.5 px; its ray passes ~0 from the origin
    assert abs(float(out["depth"][0, 0, 0, c, c]) - 2.5) < 0.01
    assert float(out["opacity"][0, 0, 0, 0, 0]) < 1e-3  # corner misses the sphere
    torch.testing.assert_close(out["rgb"][0, 0, :, 0, 0], torch.ones(3), atol=1e-3, rtol=0)  # white background
    torch.testing.assert_close(out["rgb"][0, 0, :, c, c], torch.full((3,), 0.25), atol=2e-2, rtol=0)
    # Normal at the centre pixel points back at the camera.
    n = torch.nn.functional.normalize(out["normal"][0, 0, :, c, c], dim=0)
    to_cam = torch.nn.functional.normalize(cams.centers[0, 0], dim=0)
    assert float((n * to_cam).sum()) > 0.99


def test_plane_normals_from_density():
    """A half-space x < 0.2 of constant density: normals from -grad(sigma) point +x."""
    cams = Cameras(torch.eye(4)[None, None].clone(), torch.tensor([[[[20.0, 0, 8], [0, 20, 8], [0, 0, 1]]]]), 16, 16)
    cams.c2w[..., :3, 3] = torch.tensor([0.0, 0.0, -3.0])
    field = lambda p: {"density": 40 * torch.nn.functional.softplus((0.2 - p[..., 0]) * 10), "rgb": torch.ones_like(p)}
    out = VolumeRenderer(n_samples=64, normals="auto", perturb=False)(field, cams)
    n = out["normal"][0, 0].reshape(3, -1)
    hit = out["opacity"][0, 0].reshape(-1) > 0.5
    nn = torch.nn.functional.normalize(n[:, hit], dim=0)
    assert hit.any() and (nn[0] > 0.99).all()


def test_chunking_does_not_change_result():
    cams = _cams(12)
    a = VolumeRenderer(n_samples=32, sdf_to_alpha=LaplaceDensity(0.05), perturb=False, chunk=7)(_sphere_field(), cams)
    b = VolumeRenderer(n_samples=32, sdf_to_alpha=LaplaceDensity(0.05), perturb=False, chunk=10_000)(_sphere_field(), cams)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_gradcheck_double():
    torch.manual_seed(0)
    vr = VolumeRenderer(n_samples=8, perturb=False, background="black").double()
    center = torch.tensor([0.1, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    o = torch.tensor([[[0.0, 0.0, -3.0], [0.05, 0.1, -3.0]]], dtype=torch.float64)
    d = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)

    def fn(c):
        field = lambda p: {"density": 5 * torch.exp(-((p - c) ** 2).sum(-1) * 4), "rgb": torch.sigmoid(p)}
        r = vr.render_rays(field, o, d)
        return r.rgb, r.opacity

    assert torch.autograd.gradcheck(fn, (center,))


def test_bad_args():
    with pytest.raises(ConfigError, match="aabb"):
        VolumeRenderer(aabb=(1.0, -1.0))
    with pytest.raises(ConfigError, match="sdf_to_alpha"):
        VolumeRenderer(n_samples=4)(_sphere_field(), _cams(4))
    with pytest.raises(ShapeError, match="expected batch shape"):
        VolumeRenderer(n_samples=4)(_sphere_field(), _cams(4).flatten())
    with pytest.raises(ConfigError, match="background"):
        VolumeRenderer(n_samples=4, background="pink", sdf_to_alpha=LaplaceDensity())(_sphere_field(), _cams(4))
    with pytest.raises(ShapeError, match="finite"):
        c2w = torch.eye(4)[None].clone()
        c2w[0, 0, 3] = math.nan
        Cameras(c2w, torch.eye(3)[None], 4, 4)
