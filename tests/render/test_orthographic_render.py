"""Every renderer honours orthographic cameras (issue 14 item 4), checked against closed forms.

The camera looks along world +z from ``(0, 0, -dist)`` (identity rotation), with ``s`` pixels per
world unit: world ``(x, y, z)`` lands on pixel ``(s x + cx, s y + cy)`` at depth ``z + dist`` for
any ``dist`` — an object's footprint does not shrink with distance, unlike a pinhole camera's.
"""

from __future__ import annotations

import math

import pytest
import torch

from recon3d.data.cameras import Cameras
from recon3d.render import LaplaceDensity, TorchMeshRasterizer, VolumeRenderer
from recon3d.render.gaussians import Gaussians, TorchGaussianRasterizer, project_gaussians


def _ortho(size: int, s: float, dist: float, dtype=torch.float32) -> Cameras:
    c2w = torch.eye(4, dtype=dtype)[None, None].clone()
    c2w[..., 2, 3] = -dist
    K = torch.tensor([[s, 0, size / 2], [0, s, size / 2], [0, 0, 1]], dtype=dtype)[None, None]
    return Cameras(c2w, K, size, size, projection="orthographic")


def _gaussian(mean, scales, opacity=0.7) -> Gaussians:
    return Gaussians(torch.tensor([[mean]]), torch.tensor([[[1.0, 0, 0, 0]]]), torch.tensor([[scales]]),
                     torch.full((1, 1), opacity), torch.ones(1, 1, 3))


# ---------------------------------------------------------------------------------- Gaussians
def test_gaussian_projection_has_the_constant_jacobian():
    # J = diag(s, s) (no 1/z terms): Σ2D = s² diag(σx², σy²) wherever the Gaussian sits.
    s, sig = 20.0, (0.1, 0.05, 0.3)
    for mean, dist in (([0.0, 0.0, 0.0], 2.0), ([0.4, -0.3, 1.0], 7.0)):
        p = project_gaussians(_gaussian(mean, sig), _ortho(64, s, dist), eps2d=0.0)
        torch.testing.assert_close(p["cov2d"][0, 0], torch.diag(torch.tensor([(s * sig[0]) ** 2, (s * sig[1]) ** 2])))
        torch.testing.assert_close(p["means2d"][0, 0], torch.tensor([s * mean[0] + 32, s * mean[1] + 32]))
        torch.testing.assert_close(p["depths"][0, 0], torch.tensor(mean[2] + dist))


def test_isotropic_gaussian_footprint_is_independent_of_distance():
    """Alpha = o exp(-½ d² / (s² σ² + eps2d)) around the projected centre, at any distance."""
    size, s, sig, o = 32, 24.0, 0.1, 0.6
    mean = (0.125, -0.0625, 0.0)  # projects to (19, 14.5): off-centre, between pixel centres in x
    var = (s * sig) ** 2 + 0.3
    u = torch.arange(size) + 0.5
    d2 = (u[None] - (s * mean[0] + 16)) ** 2 + (u[:, None] - (s * mean[1] + 16)) ** 2
    expected = o * torch.exp(-0.5 * d2 / var)
    expected = torch.where(expected >= 1 / 255, expected, torch.zeros_like(expected))
    for dist in (1.5, 4.0, 30.0):
        out = TorchGaussianRasterizer(background="black")(_gaussian(mean, (sig, sig, sig), o), _ortho(size, s, dist))
        # Within 3 sigma (the rasterizer's footprint radius) the closed form holds exactly.
        inside = d2 <= (3 * math.sqrt(var)) ** 2
        torch.testing.assert_close(out["alpha"][0, 0, 0][inside], expected[inside], atol=1e-5, rtol=1e-4)
        assert float(out["alpha"][0, 0, 0][~inside].max()) < 0.02
        hit = out["alpha"][0, 0, 0] > 0
        torch.testing.assert_close(out["depth"][0, 0, 0][hit], torch.full((int(hit.sum()),), dist), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- meshes
def _square(half: float, z: float = 0.0, tilt: float = 0.0):
    """Two triangles of the square [-half, half]² at depth ``z + tilt * x`` (world)."""
    xy = torch.tensor([[-half, -half], [half, -half], [half, half], [-half, half]])
    v = torch.cat([xy, (z + tilt * xy[:, :1])], 1)
    return v[None], torch.tensor([[0, 1, 2], [0, 2, 3]])


def test_mesh_square_coverage_is_scale_times_side_squared_at_any_distance():
    # s = 8 px per unit, side 2: the square spans pixels [8, 24) exactly (edges on pixel borders).
    size, s = 32, 8.0
    v, f = _square(1.0)
    want = torch.zeros(size, size)
    want[8:24, 8:24] = 1
    for dist in (1.5, 5.0, 50.0):
        fr = TorchMeshRasterizer()(v, f, _ortho(size, s, dist))
        torch.testing.assert_close(fr.mask[0, 0, 0], want)
        torch.testing.assert_close(fr.depth[0, 0, 0][want > 0], torch.full((256,), dist))


def test_mesh_depth_and_attributes_interpolate_linearly_on_a_tilted_square():
    # Plane z = 0.4 x: at pixel (u, v) the ray meets it at x = (u - cx) / s, so depth = dist + 0.4 x
    # (perspective-correct interpolation would bend this), and the interpolated x attribute is x.
    size, s, dist, tilt = 32, 10.0, 3.0, 0.4
    v, f = _square(1.2, tilt=tilt)
    fr = TorchMeshRasterizer()(v.double(), f, _ortho(size, s, dist, torch.float64))
    cov = fr.mask[0, 0, 0] > 0
    u = (torch.arange(size, dtype=torch.float64) + 0.5 - size / 2) / s  # world x of each column
    x_img = u[None].expand(size, size)
    assert int(cov.sum()) == 24 * 24
    torch.testing.assert_close(fr.depth[0, 0, 0][cov], (dist + tilt * x_img)[cov])
    x_attr = fr.interpolate(v.double()[..., :1])[0, 0, 0]
    torch.testing.assert_close(x_attr[cov], x_img[cov])


# ---------------------------------------------------------------------------------- volume
def test_volume_sphere_depth_follows_parallel_rays():
    # Sphere of radius r at the origin: the ray of pixel (u, v) at radial distance rho < r from
    # the axis meets it at z = -sqrt(r² - rho²), depth dist - sqrt(r² - rho²).
    size, s, dist, r = 16, 6.0, 3.0, 0.8
    field = lambda p: {"sdf": p.norm(dim=-1) - r, "rgb": torch.full_like(p, 0.5)}  # noqa: E731
    vr = VolumeRenderer(n_samples=96, n_importance=64, sdf_to_alpha=LaplaceDensity(0.002, learnable=False), perturb=False)
    depth = vr(field, _ortho(size, s, dist))["depth"][0, 0, 0]
    c = (torch.arange(size) + 0.5 - size / 2) / s
    rho = torch.sqrt(c[None] ** 2 + c[:, None] ** 2)
    core = rho < 0.8 * r  # away from the grazing rim
    want = dist - torch.sqrt((r**2 - rho**2).clamp_min(0))
    torch.testing.assert_close(depth[core], want[core], atol=0.02, rtol=0)
    assert float(depth[rho > r + 1.5 / s].abs().max()) < 1e-3  # rays past the silhouette miss


@pytest.mark.parametrize("renderer", ["gaussians", "mesh"])
def test_orthographic_differs_from_perspective_where_it_should(renderer):
    # The same scene through a pinhole camera of matching scale at the object (f = s * dist)
    # agrees at the centre and differs off-axis for a deep object: a guard that the branch runs.
    size, s, dist = 32, 8.0, 3.0
    persp = _ortho(size, s * dist, dist)
    persp = Cameras(persp.c2w, persp.K, size, size)
    if renderer == "gaussians":
        g = _gaussian([0.8, 0.0, 1.0], (0.05, 0.05, 0.05))
        a = project_gaussians(g, _ortho(size, s, dist))["means2d"][0, 0]
        b = project_gaussians(g, persp)["means2d"][0, 0]
        torch.testing.assert_close(a, torch.tensor([s * 0.8 + 16, 16.0]))
        torch.testing.assert_close(b, torch.tensor([s * dist * 0.8 / 4.0 + 16, 16.0]))
    else:
        v, f = _square(1.0, z=1.0)
        a = TorchMeshRasterizer()(v, f, _ortho(size, s, dist)).mask.sum()
        b = TorchMeshRasterizer()(v, f, persp).mask.sum()
        assert int(a) == 256 and int(b) == 144  # perspective: side 2 * (8 * 3 / 4) = 12 px


# ---------------------------------------------------------------------------------- CUDA backends
def _orbit_ortho(size: int, device: str) -> Cameras:
    from recon3d.data.cameras import look_at, orthographic_intrinsics

    eye = torch.tensor([[2.5, 0.0, 0.8], [0.0, -2.5, 1.2]])
    K = orthographic_intrinsics(2.4, size, size).expand(2, 3, 3)
    return Cameras(look_at(eye), K, size, size, projection="orthographic").reshape(1, 2).to(device)


@pytest.mark.gpu
def test_orthographic_parity_with_gsplat():
    from recon3d.render.gaussians import GaussianRasterizer

    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    gs = Gaussians((r(1, 300, 3) - 0.5) * 0.8, torch.randn(1, 300, 4, generator=g), r(1, 300, 3) * 0.05 + 0.02,
                   r(1, 300) * 0.8 + 0.1, r(1, 300, 3)).to("cuda")
    cams = _orbit_ortho(48, "cuda")
    outs = [GaussianRasterizer(backend=b, device="cuda", tile_size=16)(gs, cams) for b in ("torch", "gsplat")]
    for k in ("rgb", "alpha", "depth"):
        torch.testing.assert_close(outs[0][k], outs[1][k], atol=2e-4, rtol=1e-3)


@pytest.mark.gpu
def test_orthographic_parity_with_nvdiffrast():
    from recon3d.render import MeshRasterizer, grid_points, marching_cubes

    v, f = marching_cubes(grid_points(24).norm(dim=-1) - 0.6)
    cams = _orbit_ortho(64, "cuda")
    frs = [MeshRasterizer(backend=b, device="cuda")(v[None].cuda(), f.cuda(), cams) for b in ("torch", "nvdiffrast")]
    assert (frs[0].mask != frs[1].mask).float().mean() < 0.01
    both = (frs[0].mask > 0) & (frs[1].mask > 0)
    torch.testing.assert_close(frs[0].depth[both], frs[1].depth[both], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("projection", ["perspective", "orthographic"])
def test_nvdiffrast_clip_space_lands_on_the_projected_pixel(projection):
    # The edge conversion is plain torch (nvdiffrast is imported only by the rasterizer class):
    # NDC (x_c / w_c + 1) W / 2 must be the pixel Cameras.project gives, for both projections.
    from recon3d.render.mesh.nvdiffrast_rasterizer import opencv_to_clip

    ortho = _orbit_ortho(40, "cpu")
    K = ortho.K.clone()
    if projection == "perspective":
        K[..., 0, 0] = K[..., 1, 1] = 35.0  # focal length in pixels
    cams = Cameras(ortho.c2w, K, 40, 40, projection)
    pts = torch.tensor([[[0.3, -0.2, 0.1], [-0.5, 0.4, -0.3]]])  # (B=1, N=2, 3)
    clip = opencv_to_clip(pts, cams, 0.01, 50.0)  # (1, V=2, N, 4)
    uv, z = cams.project(pts[:, None].expand(1, 2, 2, 3))
    ndc = clip[..., :2] / clip[..., 3:]
    torch.testing.assert_close((ndc + 1) * 20, uv, atol=1e-4, rtol=0)
    zc = clip[..., 2] / clip[..., 3]
    if projection == "orthographic":  # the depth the rasterizer recovers from z_c
        torch.testing.assert_close(0.5 * (zc * (50.0 - 0.01) + 50.0 + 0.01), z, atol=1e-4, rtol=0)
    assert ((zc > -1) & (zc < 1)).all()
