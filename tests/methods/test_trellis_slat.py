"""TRELLIS's SLAT stages (recon3d.methods.trellis_slat): the per-voxel DINOv2 features against a
hand projection and a hand bilinear sample, the SLAT VAE and SLAT flow stages lowering their
losses on the synthetic set, the loss terms recomputed from their parts, the computed SLAT
normalisation against a direct mean/std, and bad input (no cameras, mismatched parts)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from recon3d.data.cameras import Cameras
from recon3d.errors import ConfigError, DataError, ShapeError
from recon3d.methods.trellis_slat import (
    TrellisSLatFlowModule,
    TrellisSLatVAEModule,
    slat_vae_regularizers,
    slat_voxel_features,
    voxel_centers,
)
from recon3d.models.trellis import SLatFlowModel
from recon3d.models.trellis.slat_vae import SLatEncoder
from recon3d.representations import Gaussians
from tests.methods._trellis_tiny import (
    R,
    synthetic_batch,
    tiny_dino,
    tiny_gs_decoder,
    tiny_slat_encoder,
    tiny_slat_flow,
    train_steps,
)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Two synthetic objects (meshes, 2 input + 2 target views with masks and cameras) at 16 px."""
    return synthetic_batch(tmp_path_factory.mktemp("trellis_slat_cache"), resolution=16, num_target_views=2, with_geometry=True)


# ---------------------------------------------------------------------------------- features
def _camera(eye, W: int = 28, f: float = 30.0) -> Cameras:
    """An OpenCV camera at ``eye`` looking at the origin, +Z up in the image's -y."""
    from recon3d.data.cameras import look_at

    c2w = look_at(torch.tensor(eye, dtype=torch.float32), torch.zeros(3), torch.tensor([0.0, 0.0, 1.0]))
    K = torch.tensor([[f, 0, W / 2], [0, f, W / 2], [0, 0, 1.0]])
    return Cameras(c2w[None], K[None], W, W)


def _hand_pixel(cam: Cameras, p_world: torch.Tensor) -> tuple[float, float]:
    """Pinhole projection written out in float64 (independent of Cameras.project)."""
    w2c = torch.linalg.inv(cam.c2w[0].double())
    q = w2c[:3, :3] @ p_world.double() + w2c[:3, 3]
    K = cam.K[0].double()
    return float(K[0, 0] * q[0] / q[2] + K[0, 2]), float(K[1, 1] * q[1] / q[2] + K[1, 2])


def _hand_bilinear(tokens: torch.Tensor, u: float, v: float, W: int) -> torch.Tensor:
    """Bilinear sample of ``tokens (C, G, G)`` at pixel ``(u, v)`` of a ``W``-wide image: patch
    ``(i, j)`` centred at pixel ``((j + 0.5) W / G, (i + 0.5) W / G)``, zeros outside."""
    C, G, _ = tokens.shape
    x, y = u / W * G - 0.5, v / W * G - 0.5
    x0, y0 = math.floor(x), math.floor(y)
    out = torch.zeros(C, dtype=torch.float64)
    for dy in (0, 1):
        for dx in (0, 1):
            i, j = y0 + dy, x0 + dx
            wgt = (1 - abs(x - j)) * (1 - abs(y - i))
            if 0 <= i < G and 0 <= j < G:
                out += wgt * tokens[:, i, j].double()
    return out


def test_features_sample_the_prenorm_patch_token_at_the_projected_voxel_centre():
    dino = tiny_dino()
    W = 28  # 2 x 2 patches of 14 px
    coords = torch.tensor([[5, 2, 6], [3, 3, 3]])
    centre = voxel_centers(coords[:1], R)[0]  # TRELLIS frame
    assert torch.allclose(centre, torch.tensor([5.5, 2.5, 6.5], dtype=torch.float64) / 8 - 0.5)
    world = 2 * centre  # Z up: recon3d = 2 x TRELLIS
    # Camera 1 looks along -y from the front; the voxel centre lands at an arbitrary (hand-computed) pixel.
    cam1 = _camera([0.3, -2.5, 0.4])
    u, v = _hand_pixel(cam1, world)
    assert 0 < u < W and 0 < v < W
    # Camera 2 puts the voxel centre exactly at the centre of patch (0, 0): pixel (7, 7).
    c2 = _camera([2.5, 0.2, 0.6])
    u2, v2 = _hand_pixel(c2, world)
    K2 = c2.K.clone()
    K2[0, 0, 2] += 7 - u2
    K2[0, 1, 2] += 7 - v2
    cam2 = Cameras(c2.c2w, K2, W, W)
    assert _hand_pixel(cam2, world) == pytest.approx((7.0, 7.0), abs=1e-5)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, W, W, generator=g)
    cams = Cameras.cat([cam1, cam2])
    f = slat_voxel_features(dino, images, cams, coords, R)
    assert f.shape == (2, 16) and f.dtype == torch.float32
    tokens = dino.patch_features(images)  # (2, 16, 2, 2), before the final LayerNorm
    # pre-norm: not what the (affine) final LayerNorm or the condition's non-affine one gives
    hs = dino.backbone(pixel_values=dino.prepare(images), output_hidden_states=True)
    assert torch.allclose(tokens.flatten(2).transpose(1, 2), hs.hidden_states[-1][:, 5:])
    assert not torch.allclose(tokens.flatten(2).transpose(1, 2), hs.last_hidden_state[:, 5:], atol=1e-3)
    expect = (_hand_bilinear(tokens[0], u, v, W) + tokens[1, :, 0, 0].double()) / 2
    assert torch.allclose(f[0].double(), expect, atol=1e-5)
    # Y-up datasets: recon3d = 2 (x, z, -y) of TRELLIS's point (the frame of recon3d.methods.trellis)
    c = centre
    world_y = 2 * torch.stack([c[0], c[2], -c[1]])
    uy, vy = _hand_pixel(cam1, world_y)
    fy = slat_voxel_features(dino, images[:1], cam1, coords[:1], R, up_axis="y")
    assert torch.allclose(fy[0].double(), _hand_bilinear(tokens[0], uy, vy, W), atol=1e-5)
    # masks premultiply (the object on black): a zero mask gives zero-image features
    m = torch.zeros(2, 1, W, W)
    f0 = slat_voxel_features(dino, images, cams, coords, R, masks=m, background=torch.ones(3))
    f_black = slat_voxel_features(dino, torch.zeros_like(images), cams, coords, R)
    assert torch.allclose(f0, f_black, atol=1e-6)


def test_features_refuse_missing_cameras_and_bad_coords():
    dino = tiny_dino()
    images = torch.rand(1, 3, 28, 28)
    with pytest.raises(DataError, match="cameras"):
        slat_voxel_features(dino, images, None, torch.zeros(1, 3, dtype=torch.long), R)
    with pytest.raises(ShapeError, match="coords"):
        slat_voxel_features(dino, images, _camera([0, -2.5, 0]), torch.full((1, 3), R), R)
    with pytest.raises(ShapeError, match="cameras"):
        slat_voxel_features(dino, torch.rand(2, 3, 28, 28), _camera([0, -2.5, 0]), torch.zeros(1, 3, dtype=torch.long), R)


# ---------------------------------------------------------------------------------- SLAT VAE
def _vae(**kw) -> TrellisSLatVAEModule:
    torch.manual_seed(0)
    args = dict(features=tiny_dino(), encoder=tiny_slat_encoder(), decoder=tiny_gs_decoder(2, attn_mode="full"), lambda_lpips=0.0, lr=1e-2)
    args.update(kw)
    return TrellisSLatVAEModule(**args)


def test_slat_vae_stage_lowers_the_render_loss(batch):
    model = _vae()
    x = model.slat_features(batch, model.features, R)
    assert x.num_channels == 16 and all(int(n) > 0 for n in x.counts)
    losses = train_steps(model, batch, 5)
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-2:]) < 0.8 * losses[0], losses
    terms = model.training_losses(batch)
    assert {"l1", "ssim", "kl", "reg_vol", "reg_opacity", "rec", "loss"} <= set(terms)
    expect = (terms["l1"] + 0.2 * terms["ssim"] + 1e-6 * terms["kl"] + 1e4 * terms["reg_vol"] + 1e-3 * terms["reg_opacity"])
    assert torch.allclose(terms["loss"], expect)
    rec = model.reconstruct(batch)
    g = rec.representation
    assert isinstance(g, Gaussians) and g.counts.tolist() == (x.counts * 2).tolist()
    # Gaussians stay within half a voxel (x 1.5) of their voxel, in recon3d's [-1, 1]^3
    assert float(g.packed().means.abs().max()) <= 1.0 + 2.0 / R


def test_slat_vae_regularizers_and_frame(batch):
    model = _vae()
    x = model.slat_features(batch, model.features, R)
    z = model.encoder(x, sample_posterior=False)
    g, act = model.decode_gaussians(z)
    # recon3d's world = 2 x TRELLIS's frame (Z up): means and scales doubled
    assert torch.allclose(g.means, 2 * act["world"]) and torch.allclose(g.scales, 2 * act["scaling"])
    reg = slat_vae_regularizers(act["scaling"], act["opacity"])
    s, o = act["scaling"].double(), act["opacity"].double()
    assert torch.allclose(reg["reg_vol"].double(), (s[:, 0] * s[:, 1] * s[:, 2]).mean())
    assert torch.allclose(reg["reg_opacity"].double(), ((o - 1) ** 2).mean())
    # fresh decoder: opacity = opacity_bias 0.1 everywhere
    assert torch.allclose(act["opacity"], torch.full_like(act["opacity"], 0.1))


def test_slat_vae_without_lpips_weights_says_so_once(batch, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("RECON3D_LPIPS_DIR", raising=False)
    model = _vae(lambda_lpips=0.2, lpips_weights_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="recon3d.methods.trellis_slat"):
        t1 = model.training_losses(batch)
        model.training_losses(batch)
    msgs = [r for r in caplog.records if "LPIPS" in r.getMessage()]
    assert len(msgs) == 1 and "left out" in msgs[0].getMessage()
    assert "lpips" not in t1


def test_slat_vae_bad_input(batch):
    from dataclasses import replace

    model = _vae()
    no_cams = replace(batch, targets=replace(batch.targets, cameras=None))
    with pytest.raises(DataError, match="targets.cameras"):
        model.training_losses(no_cams)
    from recon3d.data.batch import Geometry

    with pytest.raises(DataError, match="mesh_paths"):
        model.training_losses(replace(batch, geometry=Geometry()))
    model = _vae(feature_views="inputs")
    with pytest.raises(DataError, match="inputs.cameras"):
        model.slat_features(replace(batch, inputs=replace(batch.inputs, cameras=None)), model.features, R)
    with pytest.raises(ConfigError, match="in_channels"):
        TrellisSLatVAEModule(tiny_dino(), SLatEncoder(R, 8, 32, 4, num_blocks=1, num_heads=2, attn_mode="full"), tiny_gs_decoder(2, attn_mode="full"))
    with pytest.raises(ConfigError, match="latent_channels"):
        TrellisSLatVAEModule(tiny_dino(), tiny_slat_encoder(), tiny_gs_decoder(2, latent=8, attn_mode="full"))
    with pytest.raises(ConfigError, match="feature_views"):
        _vae(feature_views="some")


# ---------------------------------------------------------------------------------- SLAT flow
def test_slat_flow_normalisation_and_stage_lowers_the_flow_loss(batch):
    torch.manual_seed(0)
    enc = tiny_slat_encoder()
    with torch.no_grad():  # a fresh encoder outputs 0: give it weights so the latents vary
        enc.out_layer.weight.normal_(0, 0.5)
        enc.out_layer.bias.normal_(0, 0.5)
    model = TrellisSLatFlowModule(tiny_slat_flow(), enc, tiny_dino(), p_uncond=0.0, lr=1e-2)
    assert not bool(model.normalization_ready)
    with pytest.raises(ConfigError, match="normalisation"):
        model.training_losses(batch)
    mean, std = model.compute_normalization([batch])
    z = model.latents(batch).feats.double()
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), z.mean(0), atol=1e-6)
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), z.std(0, unbiased=False), atol=1e-6)
    assert "slat_mean" in model.state_dict() and bool(model.normalization_ready)
    assert not any(p.requires_grad for p in model.slat_encoder.parameters())
    losses = train_steps(model, batch, 10)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses

    # an untrained encoder (zero out_layer) gives constant channels: std 1 there, not ~0
    fresh = TrellisSLatFlowModule(tiny_slat_flow(), tiny_slat_encoder(), tiny_dino())
    mean0, std0 = fresh.compute_normalization([batch])
    assert mean0 == [0.0] * 4 and std0 == [1.0] * 4


def test_slat_flow_takes_the_normalisation_from_pipeline_json_or_config(tmp_path):
    import json

    from recon3d.models.trellis.pipeline_config import TRELLIS_IMAGE_LARGE_SLAT_NORMALIZATION as N

    enc = SLatEncoder(R, 16, 32, 8, num_blocks=1, num_heads=2, attn_mode="full")
    flow = SLatFlowModel(R, 8, 32, 16, 8, num_blocks=1, num_heads=2, mlp_ratio=2, patch_size=2, num_io_res_blocks=1,
                         io_block_channels=[16])
    m = TrellisSLatFlowModule(flow, enc, tiny_dino(), slat_mean=list(N["mean"]), slat_std=list(N["std"]))
    assert bool(m.normalization_ready) and torch.allclose(m.slat_std, torch.tensor(N["std"]))
    with pytest.raises(ConfigError, match="slat_std"):
        TrellisSLatFlowModule(flow, enc, tiny_dino(), slat_mean=[0.0] * 8, slat_std=[1.0] * 7)
    with pytest.raises(ConfigError, match="give both"):
        TrellisSLatFlowModule(flow, enc, tiny_dino(), slat_mean=[0.0] * 8)
    with pytest.raises(ConfigError, match="cond_channels"):
        TrellisSLatFlowModule(SLatFlowModel(R, 8, 32, 8, 8, num_blocks=1, num_heads=2, patch_size=2, num_io_res_blocks=1,
                                            io_block_channels=[16]), enc, tiny_dino())
    bad = tmp_path / "pipeline.json"
    bad.write_text(json.dumps({"name": "TrellisImageTo3DPipeline", "args": {}}))
    with pytest.raises(ConfigError, match="pipeline.json"):
        TrellisSLatFlowModule(flow, enc, tiny_dino(), pipeline=str(bad))


def test_slat_vae_with_lpips_weights_adds_the_term_outside_the_state_dict(batch, tmp_path):
    from recon3d.metrics.lpips import BACKBONE_FILES, VGG16Features

    torch.manual_seed(0)
    torch.save(VGG16Features().state_dict(), tmp_path / BACKBONE_FILES["vgg"])  # heads: torchmetrics' bundled copy
    model = _vae(lambda_lpips=0.2, lpips_weights_dir=str(tmp_path))
    keys = set(model.state_dict())
    t = model.training_losses(batch)
    assert "lpips" in t and float(t["lpips"]) > 0
    expect = t["l1"] + 0.2 * t["ssim"] + 0.2 * t["lpips"] + 1e-6 * t["kl"] + 1e4 * t["reg_vol"] + 1e-3 * t["reg_opacity"]
    assert torch.allclose(t["loss"], expect)
    # LPIPS is a fixed tool, not part of the model: checkpoints are the same with or without it
    assert set(model.state_dict()) == keys and not any("lpips" in k for k in keys)
    assert model.lpips_loss() is not None and not any(p.requires_grad for p in model.lpips_loss().parameters())
