"""Official GTR checkpoint import, checked against a re-statement of the official module structure.

The reference below restates, in a few lines, the structure of snap_gtr's ``GeneratorV3``
(``models/transformers/generator_v3.py`` + ``layers.py``) and ``BaseNeRF.decoder.field``
(``SeparateField`` in ``models/decoders/fields.py``, sampling as in ``triplane_decoder.py``), with
the same parameter names, so that its ``state_dict`` has exactly the released checkpoint's layout.
It computes its own rays the official way (``utils/ray_utils.py``: pixel centres, normalised
directions, moment ``cross(d, o)``), independent of recon3d's ray code.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from recon3d.data.cameras import orbit_cameras
from recon3d.errors import CheckpointError
from recon3d.models.encoders import ConvPatchEncoder
from recon3d.models.gtr import GTRNetwork, TriplaneField, TriplaneGenerator, load_official_gtr, official_key_table

# Small sizes in the official layout.
D, LAYERS, HEADS, DHEAD, R, C, S, P, WIDTH = 32, 2, 4, 8, 4, 6, 2, 8, 16
V, H, W = 2, 32, 32


# ----------------------------------------------------------------------------- reference (official layout)
class RefAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = HEADS
        self.to_q = nn.Linear(D, HEADS * DHEAD, bias=False)
        self.to_k = nn.Linear(D, HEADS * DHEAD, bias=False)
        self.to_v = nn.Linear(D, HEADS * DHEAD, bias=False)
        self.to_out = nn.Sequential(nn.Linear(HEADS * DHEAD, D), nn.Dropout(0.0))

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = (t.view(B, N, HEADS, DHEAD).permute(0, 2, 1, 3) for t in (self.to_q(x), self.to_k(x), self.to_v(x)))
        att = torch.softmax(q @ k.transpose(-1, -2) / DHEAD**0.5, -1)  # plain softmax attention
        return self.to_out((att @ v).permute(0, 2, 1, 3).reshape(B, N, -1))


class RefGEGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, 4 * D * 2)

    def forward(self, x):
        a, g = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(g)


class RefFeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(RefGEGLU(), nn.Dropout(0.0), nn.Linear(4 * D, D))

    def forward(self, x):
        return self.net(x)


class RefBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn, self.ff = RefAttention(), RefFeedForward()
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)

    def forward(self, x):
        x = self.self_attn(self.norm1(x)) + x
        return self.ff(self.norm2(x)) + x


class RefPSUpsampler(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(D, C * S * S, kernel_size=1)
        self.pixelshuffle = nn.PixelShuffle(S)

    def forward(self, x):
        return self.pixelshuffle(self.proj(x))


class RefGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        self.planes = nn.Parameter(torch.randn(1, 3, D, R, R))
        self.conv_proj = nn.Conv2d(10, D, kernel_size=P, stride=P, bias=False)
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn_layers = nn.ModuleList(RefBlock() for _ in range(LAYERS))
        self.out = RefPSUpsampler()

    def forward(self, images):  # (B, V, 10, H, W)
        B, Vn = images.shape[:2]
        ctx = self.conv_proj(images.flatten(0, 1))  # B*V, D, h, w
        ctx = ctx.view(B, Vn, D, -1).permute(0, 1, 3, 2).reshape(B, -1, D)  # b (v h w) c
        ctx = self.norm1(ctx)
        x = self.planes.expand(B, -1, -1, -1, -1).permute(0, 1, 3, 4, 2).reshape(B, 3 * R * R, D)
        x = torch.cat([x, ctx], 1)
        for layer in self.attn_layers:
            x = layer(x)
        x = self.norm2(x[:, : 3 * R * R])
        x = x.view(B, 3, R, R, D).permute(0, 1, 4, 2, 3).reshape(B * 3, D, R, R)
        x = self.out(x)
        return x.view(B, 3, *x.shape[1:])


class RefMLP(nn.Module):
    def __init__(self, n_layers, out_dim):
        super().__init__()
        dims = [3 * C] + [WIDTH] * (n_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.gelu(x)
        return x


class RefSeparateField(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp_sigma, self.mlp_color = RefMLP(3, 1), RefMLP(4, 3)


class RefDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.field = RefSeparateField()

    def forward(self, xyzs, code):  # xyzs (B, N, 3) in [-1, 1]; code (B, 3, C, h, w)
        B, _, Cn, h, w = code.shape
        uv = torch.stack([xyzs[..., :2], xyzs[..., ::2], xyzs[..., 1:]], 1).reshape(B * 3, 1, -1, 2)
        feat = F.grid_sample(code.reshape(B * 3, Cn, h, w), uv, mode="bilinear", padding_mode="border", align_corners=False)
        feat = feat.reshape(B, 3, Cn, -1).permute(0, 3, 2, 1).reshape(B, -1, 3 * Cn)  # channel-major interleaved
        sigma = F.softplus(self.field.mlp_sigma(feat))[..., 0]
        rgb = torch.sigmoid(self.field.mlp_color(feat)) * (1 + 2e-3) - 1e-3
        return sigma, rgb


class RefNeRF(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = RefDecoder()
        self.register_buffer("aabb", torch.tensor([-1.0, -1, -1, 1, 1, 1]))


def ref_inputs(images, masks, c2w, K):
    """Official encoder input (B, V, 10, H, W) from rgb (B,V,3,H,W), masks (B,V,1,H,W), c2w, pixel K."""
    x = torch.linspace(0.5, W - 0.5, W)
    y = torch.linspace(0.5, H - 0.5, H)
    fx, fy, cx, cy = (K[..., i, j][..., None, None] for i, j in ((0, 0), (1, 1), (0, 2), (1, 2)))
    dx = ((x - cx) / fx).expand(*K.shape[:-2], H, W)
    dy = ((y[:, None] - cy) / fy).expand(*K.shape[:-2], H, W)
    dirs = torch.stack([dx, dy, torch.ones_like(dx)], -1)
    d = F.normalize(dirs @ c2w[..., None, :3, :3].transpose(-1, -2), dim=-1)
    o = c2w[..., None, None, :3, 3].expand(d.shape)
    p = torch.cross(d, o, dim=-1)
    return torch.cat([images.permute(0, 1, 3, 4, 2), d, p, masks.permute(0, 1, 3, 4, 2)], -1).permute(0, 1, 4, 2, 3)


# ----------------------------------------------------------------------------- fixtures
class Unsafe:
    """An arbitrary pickled object, which ``weights_only=True`` refuses."""


def small_network(moment: str = "dxo", **field_kw) -> GTRNetwork:
    return GTRNetwork(
        ConvPatchEncoder(width=D, patch_size=P, moment=moment),
        TriplaneGenerator(width=D, num_layers=LAYERS, num_heads=HEADS, head_dim=DHEAD, plane_resolution=R,
                          plane_channels=C, upsample_factor=S),
        TriplaneField(plane_channels=C, hidden_dim=WIDTH, density_layers=3, color_layers=4, **field_kw),
    )


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    torch.manual_seed(0)
    gen, nerf = RefGenerator().eval(), RefNeRF().eval()
    with torch.no_grad():  # make the LayerNorm affine parameters non-trivial too
        for m in gen.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("gtr") / "ckpt.pth"
    torch.save({"pipeline": {"field": nerf.state_dict(), "generator": gen.state_dict()}, "scalers": {"scale": 1.0}}, path)
    cams = orbit_cameras(torch.tensor([0.0, 120.0]), torch.tensor([20.0, 10.0]), 2.7, 35.0, W, H, up_axis="y").reshape(1, V)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(1, V, 3, H, W, generator=g)
    masks = (torch.rand(1, V, 1, H, W, generator=g) > 0.3).float()
    points = torch.rand(1, 500, 3, generator=g) * 2.2 - 1.1  # some outside the box (border padding)
    return dict(path=path, gen=gen, nerf=nerf, cams=cams, images=images, masks=masks, points=points)


def reference_outputs(official):
    with torch.no_grad():
        x = ref_inputs(official["images"], official["masks"], official["cams"].c2w, official["cams"].K)
        planes = official["gen"](x)
        sigma, rgb = official["nerf"].decoder(official["points"], planes)
    return planes, sigma, rgb


def recon_outputs(net, official):
    net.eval()
    with torch.no_grad():
        planes = net.triplanes(official["images"], official["masks"], official["cams"])
        out = net.field(planes, official["points"])
    return planes, out["density"], out["rgb"]


# ----------------------------------------------------------------------------- tests
def test_official_weights_reproduce_reference_outputs(official):
    net = load_official_gtr(official["path"], small_network())
    ref_planes, ref_sigma, ref_rgb = reference_outputs(official)
    planes, sigma, rgb = recon_outputs(net, official)
    assert planes.shape == (1, 3, C, R * S, R * S)
    torch.testing.assert_close(planes, ref_planes, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sigma, ref_sigma, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rgb, ref_rgb, atol=1e-5, rtol=1e-5)
    assert ref_planes.abs().mean() > 0.1 and ref_sigma.std() > 1e-3  # the comparison is not vacuous


def test_key_table_covers_official_layout_exactly(official):
    net = small_network()
    table = official_key_table(net)
    official_keys = {("generator", k) for k in official["gen"].state_dict()} | {
        ("field", k) for k in official["nerf"].state_dict() if k != "aabb"
    }
    assert set(table) == official_keys
    assert set(table.values()) == set(net.state_dict())


def test_moment_sign_matters(official):
    """Loading into an encoder using o x d instead of the released d x o changes the triplane."""
    ref_planes, _, _ = reference_outputs(official)
    with pytest.raises(CheckpointError, match="moment"):
        load_official_gtr(official["path"], small_network(moment="oxd"))
    net = load_official_gtr(official["path"], small_network(moment="oxd"), check_conventions=False)
    planes, _, _ = recon_outputs(net, official)
    assert (planes - ref_planes).abs().max() > 1e-3


def test_interleaved_layout_matters(official):
    """Loading the MLPs into a plane-major field changes density and colour."""
    _, ref_sigma, ref_rgb = reference_outputs(official)
    with pytest.raises(CheckpointError, match="layout"):
        load_official_gtr(official["path"], small_network(layout="plane_major"))
    net = load_official_gtr(official["path"], small_network(layout="plane_major"), check_conventions=False)
    _, sigma, rgb = recon_outputs(net, official)
    assert (sigma - ref_sigma).abs().max() > 1e-4 and (rgb - ref_rgb).abs().max() > 1e-4


def _save(tmp_path, pipeline, name="bad.pth"):
    path = tmp_path / name
    torch.save({"pipeline": pipeline}, path)
    return path


def test_missing_and_unexpected_keys_are_listed(official, tmp_path):
    gen = dict(official["gen"].state_dict())
    field = dict(official["nerf"].state_dict())
    del gen["attn_layers.1.ff.net.2.bias"]
    field["decoder.field.mlp_normal.layers.0.weight"] = torch.zeros(3, 3)
    path = _save(tmp_path, {"generator": gen, "field": field})
    with pytest.raises(CheckpointError) as err:
        load_official_gtr(path, small_network())
    msg = str(err.value)
    # recon3d's one key-mismatch report (recon3d.utils.checkpoint.key_mismatch_report), on one line
    assert "1 missing (e.g. ['generator:attn_layers.1.ff.net.2.bias'])" in msg and "\n" not in msg
    assert "1 unexpected (e.g. ['field:decoder.field.mlp_normal.layers.0.weight'])" in msg


def test_shape_mismatch_and_wrong_sizes_raise(official, tmp_path):
    with pytest.raises(CheckpointError, match="with other shapes"):  # field hidden 512 (paper) vs 16 in the file
        net = small_network()
        net.field = TriplaneField(plane_channels=C, hidden_dim=64)
        load_official_gtr(official["path"], net)
    deeper = GTRNetwork(
        ConvPatchEncoder(width=D, patch_size=P),
        TriplaneGenerator(width=D, num_layers=LAYERS + 1, num_heads=HEADS, head_dim=DHEAD, plane_resolution=R,
                          plane_channels=C, upsample_factor=S),
        TriplaneField(plane_channels=C, hidden_dim=WIDTH),
    )
    with pytest.raises(CheckpointError, match=r"missing \(e\.g\. \['generator:attn_layers\.2\."):
        load_official_gtr(official["path"], deeper)
    deconv = small_network()
    deconv.generator = TriplaneGenerator(width=D, num_layers=LAYERS, num_heads=HEADS, head_dim=DHEAD, plane_resolution=R,
                                         plane_channels=C, upsample_factor=S, upsampler="deconv")
    with pytest.raises(CheckpointError, match="pixel shuffle"):
        load_official_gtr(official["path"], deconv)


def test_bad_files_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_official_gtr(tmp_path / "nope.pth", small_network())
    path = tmp_path / "flat.pth"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="'pipeline'"):
        load_official_gtr(path, small_network())
    path = _save(tmp_path, {"generator": {}})
    with pytest.raises(CheckpointError, match="'field' and 'generator'"):
        load_official_gtr(path, small_network())
    path = tmp_path / "unsafe.pth"
    torch.save({"pipeline": {"field": {}, "generator": {}}, "obj": Unsafe()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_official_gtr(path, small_network())


def test_full_size_table_matches_released_shapes():
    """Shapes of the released checkpoint (config_texrefine.yaml sizes), on the meta device."""
    from recon3d.models.gtr import gtr_official

    with torch.device("meta"):
        net = gtr_official()
    table, ours = official_key_table(net), net.state_dict()
    assert len(table) == 8 + 24 * 13 + 2 * (3 + 4)
    want = {
        ("generator", "planes"): (1, 3, 1024, 32, 32),
        ("generator", "conv_proj.weight"): (1024, 10, 16, 16),
        ("generator", "attn_layers.23.self_attn.to_q.weight"): (1024, 1024),
        ("generator", "attn_layers.0.ff.net.0.proj.weight"): (8192, 1024),
        ("generator", "attn_layers.0.ff.net.2.weight"): (1024, 4096),
        ("generator", "out.proj.weight"): (2560, 1024, 1, 1),
        ("field", "decoder.field.mlp_sigma.layers.0.weight"): (32, 120),
        ("field", "decoder.field.mlp_sigma.layers.2.weight"): (1, 32),
        ("field", "decoder.field.mlp_color.layers.3.weight"): (3, 32),
    }
    for key, shape in want.items():
        assert tuple(ours[table[key]].shape) == shape, key
