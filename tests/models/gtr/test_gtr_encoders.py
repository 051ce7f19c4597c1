"""Image encoders (ImageEncoder contract): conv patch, DINOv2 and VAE, built tiny from configs."""

from __future__ import annotations

import pytest
import torch

from recon3d.data.cameras import orbit_cameras
from recon3d.data.rays import plucker_embedding
from recon3d.errors import CheckpointError, ConfigError, ShapeError
from recon3d.models.encoders import ConvPatchEncoder, DinoV2Encoder, ImageEncoder, VAEEncoder, ray_input_channels

B, V, H, W = 2, 2, 32, 48

DINO_CONFIG = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=8, image_size=32)
KL_CONFIG = dict(
    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
    layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
)
TINY_CONFIG = dict(encoder_block_out_channels=[8, 8], decoder_block_out_channels=[8, 8], num_encoder_blocks=[1, 1],
                   num_decoder_blocks=[1, 1], latent_channels=4)


def inputs(seed=0, channels=4):
    g = torch.Generator().manual_seed(seed)
    az = torch.arange(B * V, dtype=torch.float32) * 70.0
    cams = orbit_cameras(az, torch.full((B * V,), 15.0), 2.5, 40.0, W, H).reshape(B, V)
    return torch.rand(B, V, channels, H, W, generator=g), cams


def test_ray_channels_are_rgb_d_dxo_mask():
    images, cams = inputs()
    x = ray_input_channels(images, cams)
    assert x.shape == (B, V, 10, H, W)
    torch.testing.assert_close(x[:, :, :3], images[:, :, :3])
    torch.testing.assert_close(x[:, :, 3:9], plucker_embedding(cams, convention="dxo", order="dm"))
    torch.testing.assert_close(x[:, :, 9:], images[:, :, 3:])
    x3 = ray_input_channels(images[:, :, :3], cams)
    assert (x3[:, :, 9] == 1).all()
    assert ray_input_channels(images, cams, use_mask=False).shape[2] == 9
    torch.testing.assert_close(ray_input_channels(images, cams, moment="oxd")[:, :, 6:9], -x[:, :, 6:9])


def test_conv_patch_encoder_tokens_are_view_major():
    torch.manual_seed(0)
    enc = ConvPatchEncoder(width=16, patch_size=8)
    assert isinstance(enc, ImageEncoder) and enc.out_dim == 16 and enc.tokens_per_view(H, W) == 24
    images, cams = inputs()
    tokens = enc(images, cams)
    assert tokens.shape == (B, V * 24, 16)
    one = enc(images[:, 1:2], cams[:, 1:2])
    torch.testing.assert_close(tokens[:, 24:48], one)
    # token 1 of a view is the patch at row 0, column 1
    x = ray_input_channels(images, cams)[:, 0, :, 0:8, 8:16]
    torch.testing.assert_close(tokens[:, 1], torch.einsum("bchw,dchw->bd", x, enc.proj.weight), atol=1e-5, rtol=1e-5)
    assert enc.proj.bias is None and enc.proj.in_channels == 10


def test_conv_patch_encoder_input_errors():
    enc = ConvPatchEncoder(width=16, patch_size=8)
    images, cams = inputs()
    with pytest.raises(ShapeError, match="^cameras"):
        enc(images, None)
    with pytest.raises(ShapeError, match="^images"):
        enc(images[:, :, :2], cams)
    with pytest.raises(ShapeError, match="^cameras"):
        enc(images[:, :1], cams)
    with pytest.raises(ConfigError, match="moment"):
        ConvPatchEncoder(moment="ox")


def test_dinov2_encoder_from_config_and_camera_conditioning(tmp_path):
    torch.manual_seed(0)
    images, cams = inputs(channels=3)
    enc = DinoV2Encoder(config=DINO_CONFIG, out_dim=24).eval()
    plain = DinoV2Encoder(config=DINO_CONFIG, camera_conditioning="none").eval()
    plain.backbone.load_state_dict(enc.backbone.state_dict())
    assert enc.out_dim == 24 and plain.out_dim == 32 and enc.tokens_per_view(H, W) == 24
    with torch.no_grad():
        t = enc(images, cams)
        p = plain(images, None)
        # zero-initialised camera projection: starts as plain DINOv2 (before the output projection)
        torch.testing.assert_close(enc.out_proj(p), t)
        torch.nn.init.normal_(enc.camera_proj.weight, std=0.1)
        t2 = enc(images, cams)
    assert t.shape == (B, V * 24, 24)
    assert (t2 - t).abs().max() > 1e-3
    # the 4th (mask) channel is ignored
    with torch.no_grad():
        torch.testing.assert_close(plain(torch.cat([images, torch.zeros_like(images[:, :, :1])], 2)), p)
    # local directory round trip, never a download
    enc.backbone.save_pretrained(tmp_path / "dino")
    loaded = DinoV2Encoder(pretrained_path=str(tmp_path / "dino"), camera_conditioning="none").eval()
    for k, v in enc.backbone.state_dict().items():
        torch.testing.assert_close(loaded.backbone.state_dict()[k], v, msg=k)
    with pytest.raises(CheckpointError, match="not a directory"):
        DinoV2Encoder(pretrained_path=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="exactly one"):
        DinoV2Encoder()


def test_dinov2_output_conditioning_differs_from_input_conditioning():
    torch.manual_seed(0)
    images, cams = inputs(channels=3)
    a = DinoV2Encoder(config=DINO_CONFIG, camera_conditioning="plucker_input").eval()
    b = DinoV2Encoder(config=DINO_CONFIG, camera_conditioning="plucker_output").eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        torch.nn.init.normal_(a.camera_proj.weight, std=0.1)
        b.camera_proj.weight.copy_(a.camera_proj.weight)
        ta, tb = a(images, cams), b(images, cams)
    assert ta.shape == tb.shape and (ta - tb).abs().max() > 1e-4


@pytest.mark.parametrize("arch,config", [("kl", KL_CONFIG), ("tiny", TINY_CONFIG)])
def test_vae_encoder_from_config(arch, config):
    torch.manual_seed(0)
    enc = VAEEncoder(config=config, arch=arch, width=16, patch_size=4, freeze_vae=True)
    assert enc.vae_factor == 2 and enc.out_dim == 16
    images, cams = inputs()
    tokens = enc(images, cams)
    assert tokens.shape == (B, V * enc.tokens_per_view(H, W), 16) and enc.tokens_per_view(H, W) == 96
    tokens.square().mean().backward()
    assert enc.assemble.weight.grad is not None
    assert all(p.grad is None for p in enc.vae_encoder.parameters())
    with pytest.raises(ConfigError, match="patch_size"):
        VAEEncoder(config=config, arch=arch, patch_size=3)
