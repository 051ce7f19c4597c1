"""GTR networks at a tiny CPU size: shapes, speed, gradient checkpointing, freezing, config errors."""

from __future__ import annotations

import pytest
import torch

from recon3d.data.cameras import orbit_cameras
from recon3d.errors import ConfigError, ShapeError
from recon3d.models.encoders import ConvPatchEncoder
from recon3d.models.gtr import GTRNetwork, TriplaneField, TriplaneGenerator, gtr_official, gtr_paper, gtr_tiny

B, V, HW = 1, 4, 64


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cams = orbit_cameras(torch.tensor([0.0, 90.0, 180.0, 270.0]), torch.full((4,), 20.0), 2.5, 40.0, HW, HW)
    images = torch.rand(B, V, 3, HW, HW, generator=g)
    masks = (torch.rand(B, V, 1, HW, HW, generator=g) > 0.5).float()
    points = torch.rand(B, 2048, 3, generator=g) * 2 - 1
    return images, masks, cams.reshape(B, V), points


def _loss(net, images, masks, cams, points):
    out = net(images, cams, points, masks=masks)
    return out["density"].mean() + out["rgb"].square().mean() + out["planes"].square().mean()


def test_tiny_forward_backward_shapes():
    torch.manual_seed(0)
    net = gtr_tiny()
    images, masks, cams, points = inputs()
    planes = net.triplanes(images, masks, cams)
    assert planes.shape == (B, 3, 8, 16, 16)
    out = net.field(planes, points)
    assert out["density"].shape == (B, 2048) and out["rgb"].shape == (B, 2048, 3)
    assert (out["density"] >= 0).all() and (out["rgb"] >= -1e-3).all() and (out["rgb"] <= 1 + 1e-3).all()
    # Speed is measured in benchmarks/bench_gtr.py, never asserted in a unit test (shared machines).
    _loss(net, images, masks, cams, points).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_gradient_checkpointing_gives_identical_gradients():
    images, masks, cams, points = inputs(1)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        net = gtr_tiny(gradient_checkpointing=ckpt).train()
        _loss(net, images, masks, cams, points).backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=0, rtol=0, msg=n)


def test_masks_default_to_ones_and_fourth_channel_is_mask():
    torch.manual_seed(0)
    net = gtr_tiny().eval()
    images, masks, cams, _ = inputs(2)
    with torch.no_grad():
        a = net.triplanes(images, None, cams)
        b = net.triplanes(images, torch.ones_like(masks), cams)
        c = net.triplanes(torch.cat([images, masks], 2), None, cams)
        d = net.triplanes(images, masks, cams)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(c, d)
    assert (a - d).abs().max() > 1e-4


def test_field_mlps_freeze_separately():
    torch.manual_seed(0)
    field = TriplaneField(plane_channels=8, hidden_dim=16)
    planes = torch.randn(2, 3, 8, 16, 16, requires_grad=True)
    points = torch.rand(2, 100, 3) * 2 - 1
    field.set_trainable(density=False)
    out = field(planes, points)
    (out["density"].sum() + out["rgb"].sum()).backward()
    assert all(p.grad is None for p in field.density_mlp.parameters())
    assert all(p.grad is not None for p in field.color_mlp.parameters())
    assert planes.grad is not None
    field.set_trainable(density=True, color=False)
    assert all(p.requires_grad for p in field.density_mlp.parameters())
    assert not any(p.requires_grad for p in field.color_mlp.parameters())
    torch.testing.assert_close(field.density(planes, points), out["density"])
    torch.testing.assert_close(field.color(planes, points), out["rgb"])


def test_field_sizes_paper_and_official():
    paper, official = TriplaneField(), TriplaneField(hidden_dim=32)
    assert [tuple(m.weight.shape) for m in paper.density_mlp.layers] == [(512, 120), (512, 512), (1, 512)]
    assert [tuple(m.weight.shape) for m in official.color_mlp.layers] == [(32, 120), (32, 32), (32, 32), (3, 32)]


def test_deconv_upsampler_and_token_projection():
    torch.manual_seed(0)
    gen = TriplaneGenerator(width=32, num_layers=1, num_heads=2, head_dim=8, plane_resolution=4, plane_channels=5,
                            upsample_factor=2, upsampler="deconv")
    net = GTRNetwork(ConvPatchEncoder(width=48, patch_size=16), gen, TriplaneField(plane_channels=5, hidden_dim=8))
    images, masks, cams, points = inputs(3)
    out = net(images, cams, points, masks=masks)
    assert out["planes"].shape == (B, 3, 5, 8, 8)
    assert isinstance(net.token_proj, torch.nn.Linear)


def test_config_and_shape_errors_name_the_argument():
    with pytest.raises(ConfigError, match="plane_channels"):
        GTRNetwork(ConvPatchEncoder(width=16), TriplaneGenerator(width=16, num_layers=1, num_heads=1, head_dim=8, plane_channels=4),
                   TriplaneField(plane_channels=8))
    with pytest.raises(ConfigError, match="upsampler"):
        TriplaneGenerator(upsampler="bilinear")
    net = gtr_tiny()
    images, masks, cams, points = inputs()
    with pytest.raises(ShapeError, match="^tokens"):
        net.generator(torch.zeros(1, 10, 3))
    with pytest.raises(ShapeError, match="^masks"):
        net.triplanes(images, masks[:, :2], cams)
    with pytest.raises(ShapeError, match="^cameras"):
        net.triplanes(images[:, :, :, :32, :32], None, cams)
    with pytest.raises(ShapeError, match="^planes"):
        net.field(torch.zeros(1, 3, 4, 16, 16), points)
    with pytest.raises(ShapeError, match="^points"):
        net.field(torch.zeros(1, 3, 8, 16, 16), points[..., :2])


def test_presets_have_documented_sizes():
    with torch.device("meta"):  # shapes only: the full-size network is ~400M parameters
        official, paper = gtr_official(), gtr_paper()
    assert tuple(official.generator.planes.shape) == (1, 3, 1024, 32, 32)
    assert len(official.generator.blocks) == 24 and official.generator.output_resolution == 256
    assert tuple(official.encoder.proj.weight.shape) == (1024, 10, 16, 16)
    assert official.field.density_mlp.layers[0].out_features == 32
    assert paper.field.density_mlp.layers[0].out_features == 512
