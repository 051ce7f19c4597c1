from __future__ import annotations

import math

import pytest
import torch

from recon3d.data.cameras import Cameras, orbit_cameras
from recon3d.errors import ConfigError, ShapeError
from recon3d.render import GaussianRasterizer, Gaussians, TorchGaussianRasterizer, load_ply, save_ply
from recon3d.render.gaussians import eval_sh, project_gaussians
from recon3d.render.gaussians.model import rgb_to_sh_dc


def _front_camera(size=32, f=40.0, dist=2.0, dtype=torch.float32):
    c2w = torch.eye(4, dtype=dtype)[None, None].clone()
    c2w[..., 2, 3] = -dist
    K = torch.tensor([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1]], dtype=dtype)[None, None]
    return Cameras(c2w, K, size, size)


def _random(B=1, N=50, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g, dtype=dtype)
    return Gaussians((r(B, N, 3) - 0.5) * 0.8, torch.randn(B, N, 4, generator=g, dtype=dtype), r(B, N, 3) * 0.05 + 0.02, r(B, N) * 0.8 + 0.1, r(B, N, 3))


def test_single_gaussian_footprint_matches_closed_form():
    """An isotropic Gaussian facing the camera projects to a 2D Gaussian of std f*s/z (+ eps2d)."""
    s, z, f, o = 0.05, 2.0, 40.0, 0.6
    g = Gaussians(torch.zeros(1, 1, 3), torch.tensor([[[1.0, 0, 0, 0]]]), torch.full((1, 1, 3), s), torch.full((1, 1), o), torch.ones(1, 1, 3))
    cams = _front_camera(32, f, z)
    out = TorchGaussianRasterizer(background="black")(g, cams)
    var = (f * s / z) ** 2 + 0.3
    u = torch.arange(32) + 0.5 - 16
    d2 = u[None] ** 2 + u[:, None] ** 2
    expected = o * torch.exp(-0.5 * d2 / var)
    expected = torch.where(expected >= 1 / 255, expected, torch.zeros_like(expected))
    torch.testing.assert_close(out["alpha"][0, 0, 0], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["rgb"][0, 0, 0], expected, atol=1e-5, rtol=1e-4)
    hit = out["alpha"][0, 0, 0] > 0
    torch.testing.assert_close(out["depth"][0, 0, 0][hit], torch.full((int(hit.sum()),), z))


def test_projection_cov2d_closed_form():
    g = Gaussians(torch.tensor([[[0.1, -0.2, 0.0]]]), torch.tensor([[[1.0, 0, 0, 0]]]), torch.tensor([[[0.1, 0.05, 0.02]]]), torch.ones(1, 1), torch.ones(1, 1, 3))
    p = project_gaussians(g, _front_camera(64, 50.0, 2.0), eps2d=0.0)
    x, y, z = 0.1, -0.2, 2.0
    J = torch.tensor([[50 / z, 0, -50 * x / z**2], [0, 50 / z, -50 * y / z**2]])
    cov = J @ torch.diag(torch.tensor([0.1, 0.05, 0.02]) ** 2) @ J.T
    torch.testing.assert_close(p["cov2d"][0, 0], cov)
    torch.testing.assert_close(p["means2d"][0, 0], torch.tensor([50 * x / z + 32, 50 * y / z + 32]))


def test_batched_over_b_and_v_matches_one_by_one():
    g = _random(B=2, N=40)
    cams = orbit_cameras(torch.tensor([0.0, 90.0, 10, 200]), torch.tensor([10.0, 30, -5, 0]), 2.0, 45, 24, 20).reshape(2, 2)
    r = TorchGaussianRasterizer(background="white")
    full = r(g, cams)
    assert full["rgb"].shape == (2, 2, 3, 20, 24) and full["alpha"].shape == (2, 2, 1, 20, 24)
    for b in range(2):
        for v in range(2):
            one = r(g[b], cams[b : b + 1, v : v + 1])
            for k in ("rgb", "alpha", "depth"):
                torch.testing.assert_close(full[k][b, v], one[k][0, 0], atol=1e-5, rtol=1e-5)


def test_tile_size_and_chunk_do_not_change_result():
    g = _random(N=40)
    cams = orbit_cameras(torch.tensor([30.0]), torch.tensor([10.0]), 2.0, 45, 24, 24).reshape(1, 1)
    a = TorchGaussianRasterizer(tile_size=16, chunk=64)(g, cams)
    b = TorchGaussianRasterizer(tile_size=16, chunk=3, checkpoint_chunks=False)(g, cams)
    torch.testing.assert_close(a["rgb"], b["rgb"], atol=1e-5, rtol=1e-5)


def test_sh_degree0_equals_rgb_and_sh_shapes():
    g = _random(N=30)
    sh = Gaussians(g.means, g.quats, g.scales, g.opacities, rgb_to_sh_dc(g.colors)[:, :, None], sh_degree=0)
    cams = orbit_cameras(torch.tensor([0.0]), torch.tensor([0.0]), 2.0, 45, 16, 16).reshape(1, 1)
    torch.testing.assert_close(TorchGaussianRasterizer()(g, cams)["rgb"], TorchGaussianRasterizer()(sh, cams)["rgb"], atol=1e-5, rtol=1e-5)
    coeffs = torch.randn(5, 16, 3)
    dirs = torch.nn.functional.normalize(torch.randn(5, 3), dim=-1)
    assert eval_sh(coeffs, dirs, 3).shape == (5, 3)


def test_gradcheck_double():
    torch.manual_seed(0)
    g0 = _random(N=3, dtype=torch.float64)
    cams = _front_camera(6, 9.0, 2.0, torch.float64)
    r = TorchGaussianRasterizer(background="black", checkpoint_chunks=False)

    def fn(means, scales, opac):
        out = r(Gaussians(means, g0.quats, scales, opac, g0.colors), cams)
        return out["rgb"], out["depth"]

    args = tuple(x.clone().requires_grad_(True) for x in (g0.means, g0.scales, g0.opacities * 0.5))
    assert torch.autograd.gradcheck(fn, args, atol=1e-5, rtol=1e-3)


def test_checkpointed_gradients_match():
    g = _random(N=30)
    cams = orbit_cameras(torch.tensor([0.0, 60.0]), torch.tensor([0.0, 20.0]), 2.0, 45, 16, 16).reshape(1, 2)
    grads = []
    for ck in (True, False):
        m = g.means.clone().requires_grad_(True)
        out = TorchGaussianRasterizer(checkpoint_chunks=ck, chunk=4)(Gaussians(m, g.quats, g.scales, g.opacities, g.colors), cams)
        (out["rgb"].square().sum() + out["depth"].sum()).backward()
        grads.append(m.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_ply_roundtrip(tmp_path):
    g = _random(N=20)
    save_ply(tmp_path / "a.ply", g)
    h = load_ply(tmp_path / "a.ply")
    torch.testing.assert_close(h.means, g.means)
    torch.testing.assert_close(h.scales, g.scales, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.opacities, g.opacities, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h.colors, g.colors, rtol=1e-5, atol=1e-5)
    sh = Gaussians(g.means, g.quats, g.scales, g.opacities, torch.randn(1, 20, 16, 3), sh_degree=3)
    save_ply(tmp_path / "b.ply", sh)
    header = (tmp_path / "b.ply").read_bytes().split(b"end_header")[0].decode()
    assert "property float f_rest_44" in header and "property float rot_3" in header
    h = load_ply(tmp_path / "b.ply")
    assert h.sh_degree == 3
    torch.testing.assert_close(h.colors, sh.colors)


def test_bad_args():
    with pytest.raises(ShapeError, match="non-empty"):
        Gaussians(torch.zeros(1, 0, 3), torch.zeros(1, 0, 4), torch.zeros(1, 0, 3), torch.zeros(1, 0), torch.zeros(1, 0, 3))
    with pytest.raises(ShapeError, match="quats"):
        Gaussians(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2), torch.zeros(1, 2, 3))
    with pytest.raises(ShapeError, match="means"):
        Gaussians(torch.full((1, 1, 3), math.nan), torch.ones(1, 1, 4), torch.ones(1, 1, 3), torch.ones(1, 1), torch.ones(1, 1, 3))
    with pytest.raises(ShapeError, match="cameras"):
        TorchGaussianRasterizer()(_random(B=2), _front_camera())
    with pytest.raises(ConfigError, match="backend"):
        GaussianRasterizer(backend="cuda")


def test_backend_selection(recwarn):
    from recon3d.errors import BackendUnavailableError

    assert GaussianRasterizer(backend="torch").backend == "torch"
    if not torch.cuda.is_available():
        assert GaussianRasterizer(backend="auto").backend == "torch"
        with pytest.raises(BackendUnavailableError, match="gsplat"):
            GaussianRasterizer(backend="gsplat")


@pytest.mark.gpu
def test_parity_with_gsplat():
    g = _random(N=500).to("cuda")
    cams = orbit_cameras(torch.tensor([0.0, 90.0]), torch.tensor([20.0, 0]), 2.0, 45, 64, 48).reshape(1, 2).to("cuda")
    outs, grads = [], []
    for backend in ("torch", "gsplat"):
        m = g.means.clone().requires_grad_(True)
        r = GaussianRasterizer(backend=backend, device="cuda", tile_size=16)
        out = r(Gaussians(m, g.quats, g.scales, g.opacities, g.colors), cams)
        (out["rgb"].sum() + out["alpha"].sum()).backward()
        outs.append(out)
        grads.append(m.grad)
    for k in ("rgb", "alpha", "depth"):
        torch.testing.assert_close(outs[0][k], outs[1][k], atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-3, rtol=1e-2)
