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
    assert float(out["alpha"][0, 0, 0, 0, 0]) < 1e-3  # corner misses the sphere
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
    hit = out["alpha"][0, 0].reshape(-1) > 0.5
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
        return r.rgb, r.alpha

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


# ----------------------------------------------------------------------------- bounded compositing
def _box_rays(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through the centre of [-1, 1]^3 from outside, random unit directions (float64)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.nn.functional.normalize(torch.randn(1, n, 3, generator=g, dtype=torch.float64), dim=-1)
    return -3.0 * d, d


def _official_uniform_composite(sigma_fn, o, d, near, far, S, bg=1.0):
    """GTR/nerfstudio's uniform sampler, restated: S equal bins in [near, far], a sample at each bin
    centre, segment = the bin width for every sample (the last included), white background."""
    edges = near[..., None] + (far - near)[..., None] * torch.linspace(0, 1, S + 1, dtype=o.dtype)
    mid, delta = 0.5 * (edges[..., 1:] + edges[..., :-1]), edges[..., 1:] - edges[..., :-1]
    pts = o[..., None, :] + mid[..., None] * d[..., None, :]
    sig, rgb = sigma_fn(pts)
    alpha = 1 - torch.exp(-sig * delta)
    T = torch.exp(-torch.cumsum(torch.cat([torch.zeros_like(delta[..., :1]), (sig * delta)[..., :-1]], -1), -1))
    w = alpha * T
    return (w[..., None] * rgb).sum(-2) + (1 - w.sum(-1, keepdim=True)) * bg, w.sum(-1)


@pytest.mark.parametrize("perturb", [False, True])
def test_empty_box_renders_background_exactly(perturb):
    o, d = _box_rays(64)
    r = VolumeRenderer(n_samples=32, perturb=perturb, background="white").double()
    out = r.render_rays(lambda p: {"density": torch.zeros(p.shape[:-1], dtype=p.dtype), "rgb": torch.zeros_like(p)}, o, d)
    assert torch.equal(out.alpha, torch.zeros_like(out.alpha))
    assert torch.equal(out.rgb, torch.ones_like(out.rgb))


def test_near_empty_field_lets_the_background_through():
    """The defect: with an infinite last segment every ray through a softplus field was opaque."""
    o, d = _box_rays(256)
    chord = 2.0 / d.abs().amax(-1)  # closed form for a ray through the cube's centre
    for level in (5e-6, 1e-5, 2e-5):

        def field(p, level=level):  # black colour: any opacity darkens the white background
            return {"density": torch.full(p.shape[:-1], level, dtype=p.dtype), "rgb": torch.zeros_like(p)}

        for perturb in (False, True):
            out = VolumeRenderer(n_samples=32, perturb=perturb).render_rays(field, o, d)
            torch.testing.assert_close(out.alpha, 1 - torch.exp(-level * chord), rtol=1e-7, atol=1e-15)
            assert float((1 - out.rgb).abs().max()) < 1e-4  # white shows through
        legacy = VolumeRenderer(n_samples=32, perturb=False, last_delta="inf").render_rays(field, o, d)
        assert float(legacy.alpha.min()) > 0.99  # the unbounded rule, kept as an option


@pytest.mark.parametrize("sigma", [0.3, 2.0, 8.0])
def test_constant_density_matches_closed_form_transmittance(sigma):
    """Opacity 1 - exp(-sigma L) for the true chord L, for every sample count and with jitter."""
    o, d = _box_rays(128, seed=2)
    chord = 2.0 / d.abs().amax(-1)

    def field(p):
        return {"density": torch.full(p.shape[:-1], sigma, dtype=p.dtype), "rgb": torch.full_like(p, 0.5)}

    for S, perturb in ((2, False), (7, True), (64, True)):
        out = VolumeRenderer(n_samples=S, perturb=perturb).render_rays(field, o, d)
        torch.testing.assert_close(out.alpha, 1 - torch.exp(-sigma * chord), rtol=1e-7, atol=1e-8)


def test_density_slab_matches_closed_form_chord():
    """A slab |x| < a of density sigma: opacity 1 - exp(-sigma * 2a / |d_x|) (rays leave the slab
    through its x faces inside the box); the error is one bin of optical depth at most."""
    a, sigma, S = 0.4, 3.0, 2048
    g = torch.Generator().manual_seed(3)
    d = torch.cat([torch.ones(1, 32, 1, dtype=torch.float64), 0.3 * (torch.rand(1, 32, 2, generator=g, dtype=torch.float64) - 0.5)], -1)
    d = torch.nn.functional.normalize(d, dim=-1)
    o = -3.0 * d

    def field(p):
        return {"density": sigma * (p[..., 0].abs() < a).to(p.dtype), "rgb": torch.zeros_like(p)}

    out = VolumeRenderer(n_samples=S, perturb=False).render_rays(field, o, d)
    expected = 1 - torch.exp(-sigma * 2 * a / d[..., 0].abs())
    bin_depth = sigma * 2 * (2.0 / d.abs().amax(-1)) / S  # two bins of optical depth at the slab faces
    assert ((out.alpha - expected).abs() <= bin_depth).all()


def test_matches_official_uniform_renderer_on_a_random_field():
    """Against a restatement of the official uniform-bin compositing on a smooth random field."""
    g = torch.Generator().manual_seed(4)
    W1, W2 = torch.randn(3, 16, generator=g, dtype=torch.float64), torch.randn(16, 4, generator=g, dtype=torch.float64)

    def sigma_rgb(p):
        h = torch.tanh(p @ W1) @ W2
        return torch.nn.functional.softplus(h[..., 0] - 1.0), torch.sigmoid(h[..., 1:])

    def field(p):
        s, c = sigma_rgb(p)
        return {"density": s, "rgb": c}

    cams = _cams(12)
    from recon3d.data.rays import camera_rays

    o, d = camera_rays(cams)
    o, d = o.reshape(1, -1, 3).double(), d.reshape(1, -1, 3).double()
    r = VolumeRenderer(n_samples=48, perturb=False, min_near=0.2)
    out = r.render_rays(field, o, d)
    near, far, hit = ray_aabb(o, d, torch.tensor([[-1.0] * 3, [1.0] * 3], dtype=torch.float64), 0.2)
    ref_rgb, ref_acc = _official_uniform_composite(sigma_rgb, o, d, near, far, 48)
    ref_rgb = torch.where(hit[..., None], ref_rgb, torch.ones_like(ref_rgb))
    torch.testing.assert_close(out.rgb, ref_rgb, rtol=0, atol=1e-7)  # the old infinite last segment: off by up to 0.5
    torch.testing.assert_close(out.alpha, torch.where(hit, ref_acc, torch.zeros_like(ref_acc)), rtol=0, atol=1e-7)


def test_last_delta_and_min_near_are_checked():
    with pytest.raises(ConfigError, match="last_delta"):
        VolumeRenderer(last_delta="bogus")
    with pytest.raises(ConfigError, match="min_near"):
        VolumeRenderer(min_near=-1.0)
