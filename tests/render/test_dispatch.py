"""``recon3d.render.render``: each route equals the direct renderer call; unsupported types are one line."""

from __future__ import annotations

import pytest
import torch

from recon3d.data.cameras import Cameras, orbit_cameras
from recon3d.errors import ConfigError
from recon3d.render import MeshRasterizer, TorchGaussianRasterizer, VolumeRenderer, render
from recon3d.representations import Gaussians, Meshes, NeuralField, RenderOutput, SparseVoxels, Triplanes


def _cams(B=1, V=2, size=12):
    az = torch.linspace(0, 300, B * V)
    return orbit_cameras(az, torch.full_like(az, 15.0), 2.5, 45, size, size).reshape(B, V)


def _front_camera(size=32, f=40.0, dist=2.0):
    c2w = torch.eye(4)[None, None].clone()
    c2w[..., 2, 3] = -dist
    K = torch.tensor([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1]])[None, None]
    return Cameras(c2w, K, size, size)


def _equal(a: RenderOutput, b, keys=("rgb", "alpha", "depth")):
    for k in keys:
        assert torch.equal(a[k], b[k]), k


def _triplanes(B=2):
    from recon3d.models.gtr.field import TriplaneField

    torch.manual_seed(0)
    field = TriplaneField(plane_channels=4, hidden_dim=16)
    return Triplanes(torch.randn(B, 3, 4, 8, 8), field)


def test_gaussians_route_equals_the_rasterizer():
    g = torch.Generator().manual_seed(0)
    gs = Gaussians((torch.rand(2, 30, 3, generator=g) - 0.5) * 0.8, torch.randn(2, 30, 4, generator=g),
                   torch.rand(2, 30, 3, generator=g) * 0.05 + 0.02, torch.rand(2, 30, generator=g), torch.rand(2, 30, 3, generator=g))
    cams = _cams(2)
    out = render(gs, cams, "black", backend="torch")
    assert isinstance(out, RenderOutput)
    _equal(out, TorchGaussianRasterizer(background="black")(gs, cams))


def test_triplane_and_field_routes_equal_the_volume_renderer():
    tp = _triplanes()
    cams = _cams(2)
    direct = VolumeRenderer(aabb=tp.decoder.aabb, n_samples=16, perturb=False, background="white")(lambda p: tp.decoder(tp.planes, p), cams)
    with torch.no_grad():
        _equal(render(tp, cams, n_samples=16, perturb=False), direct)
        # a generic field (e.g. M3D's closure over one batch's features) takes the same route
        _equal(render(NeuralField(tp, (-1.0, 1.0), 2), cams, n_samples=16, perturb=False), direct)
        # one representation per object: consecutive camera rows
        _equal(render(tp.split(), cams, n_samples=16, perturb=False), direct)


def test_a_given_renderer_is_reused_with_this_calls_background():
    tp = _triplanes(1)
    cams = _cams(1)
    mine = VolumeRenderer(n_samples=8, perturb=False, background="white")
    with torch.no_grad():
        out = render(tp, cams, "black", renderer=mine)
        _equal(out, VolumeRenderer(n_samples=8, perturb=False, background="black")(tp, cams))
    assert mine.background == "white"  # restored after the call


def test_mesh_route_equals_rasterizer_plus_shading_and_the_closed_form():
    # A square at z = 0 facing the camera (outward normal -z), coloured red, 2 units away.
    v = torch.tensor([[-0.5, -0.5, 0.0], [-0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.5, -0.5, 0.0]])
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    red = torch.tensor([[1.0, 0.0, 0.0]]).expand(4, 3)
    cams = _front_camera()
    out = render(Meshes.single(v, f, red), cams, "white", backend="torch")
    frags = MeshRasterizer("torch")(v[None], f, cams)
    hard = frags.mask
    torch.testing.assert_close(out.rgb, frags.interpolate(red[None]) * hard + (1 - hard), rtol=0, atol=0)
    assert torch.equal(out.alpha, hard) and torch.equal(out.depth, frags.depth)
    c = 16  # centre pixel: on the square; corner pixel: background
    torch.testing.assert_close(out.rgb[0, 0, :, c, c], torch.tensor([1.0, 0, 0]))
    torch.testing.assert_close(out.normal[0, 0, :, c, c], torch.tensor([0.0, 0, -1]))
    torch.testing.assert_close(out.depth[0, 0, 0, c, c], torch.tensor(2.0))
    assert float(out.alpha[0, 0, 0, 0, 0]) == 0 and torch.equal(out.rgb[0, 0, :, 0, 0], torch.ones(3))
    # ragged: the same square next to an empty object
    two = render(Meshes([v, torch.zeros(0, 3)], [f, torch.zeros(0, 3, dtype=torch.long)], [red, torch.zeros(0, 3)]),
                 _two(cams), "white", backend="torch")
    assert torch.equal(two.rgb[:1], out.rgb) and not two.alpha[1].any() and torch.equal(two.rgb[1], torch.ones_like(two.rgb[1]))


def _two(cams: Cameras) -> Cameras:
    return Cameras(cams.c2w.expand(2, -1, -1, -1), cams.K.expand(2, -1, -1, -1), cams.width, cams.height)


def test_unsupported_type_is_one_line():
    v = SparseVoxels(torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 2), 4)
    with pytest.raises(ConfigError, match=r"cannot render a SparseVoxels; supported: Gaussians, Meshes, Triplanes, NeuralField") as e:
        render(v, _cams())
    assert "\n" not in str(e.value)
