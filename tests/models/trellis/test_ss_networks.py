"""TRELLIS's sparse-structure VAE and flow at tiny size: shapes, closed forms, the empty-decode
error, zero-init velocity, and a few training steps that lower the losses on synthetic shapes."""

from __future__ import annotations

import math

import pytest
import torch

from recon3d.data.synthetic.shapes import sample_object
from recon3d.errors import DataError, ShapeError
from recon3d.models.flow import RectifiedFlowObjective
from recon3d.models.trellis import TRELLIS_PRESETS, build_trellis_model, occupancy_to_voxels, pixel_shuffle_3d, ss_vae_loss
from recon3d.models.trellis.modules import absolute_position_embedding, grid_coordinates, patchify, timestep_embedding, unpatchify


def _model(preset: str, seed: int = 0):
    torch.manual_seed(seed)
    p = TRELLIS_PRESETS[preset]
    return build_trellis_model(p["name"], p["args"])


def _occupancy(seeds, res: int = 16) -> torch.Tensor:
    """``(B, 1, res^3)`` solid occupancy of synthetic SDF objects at voxel centres of [-1, 1]^3."""
    c = (torch.arange(res, dtype=torch.float32) + 0.5) / res * 2 - 1
    pts = torch.stack(torch.meshgrid(c, c, c, indexing="ij"), -1)
    return torch.stack([(sample_object(s).sdf(pts) < 0).float() for s in seeds])[:, None]


# ------------------------------------------------------------------------------ spatial ops
def test_pixel_shuffle_3d_against_loop_reference():
    x = torch.randn(2, 3 * 27, 2, 3, 4, dtype=torch.float64)
    r = 3
    ref = torch.empty(2, 3, 6, 9, 12, dtype=torch.float64)
    for c in range(3):
        for i in range(r):
            for j in range(r):
                for k in range(r):
                    ref[:, c, i::r, j::r, k::r] = x[:, c * r**3 + i * r * r + j * r + k]
    torch.testing.assert_close(pixel_shuffle_3d(x, r), ref, rtol=0, atol=0)
    # patchify inverts it, and a patch-2 token holds the voxel block it says it holds
    torch.testing.assert_close(patchify(pixel_shuffle_3d(x, r), r), x, rtol=0, atol=0)
    y = torch.randn(1, 2, 4, 4, 4)
    p = patchify(y, 2)
    assert p.shape == (1, 16, 2, 2, 2)
    torch.testing.assert_close(p[0, 1 * 8 + 0 * 4 + 1 * 2 + 1, 1, 0, 1], y[0, 1, 2, 1, 3])
    torch.testing.assert_close(unpatchify(p, 2), y)


def test_position_and_timestep_embeddings_closed_form():
    coords = grid_coordinates(4)
    assert coords.shape == (64, 3) and coords[1].tolist() == [0, 0, 1] and coords[16].tolist() == [1, 0, 0]
    C = 64  # 10 frequencies per axis, 60 columns used, 4 zero
    emb = absolute_position_embedding(coords, C).double()
    n, a, f = 37, 1, 7
    x = coords[n, a].item()
    freq = 10000.0 ** (-f / 10)
    assert emb[n, a * 20 + f].item() == pytest.approx(math.sin(x * freq), abs=1e-6)
    assert emb[n, a * 20 + 10 + f].item() == pytest.approx(math.cos(x * freq), abs=1e-6)
    assert emb[:, 60:].abs().max() == 0
    t = torch.tensor([0.0, 250.0, 1000.0])
    te = timestep_embedding(t, 256).double()
    i = 5
    w = math.exp(-math.log(10000) * i / 128)
    assert te[1, i].item() == pytest.approx(math.cos(250 * w), abs=1e-5)  # cos first
    assert te[1, 128 + i].item() == pytest.approx(math.sin(250 * w), abs=1e-5)
    assert timestep_embedding(t, 7).shape == (3, 7) and timestep_embedding(t, 7)[:, -1].abs().max() == 0


# --------------------------------------------------------------------------------- SS-VAE
def test_ss_vae_round_trip_shapes_and_sampling():
    enc, dec = _model("ss_enc_tiny"), _model("ss_dec_tiny")
    x = _occupancy([0, 1])
    with torch.no_grad():
        z, mean, logvar = enc(x, sample_posterior=True, return_raw=True, generator=torch.Generator().manual_seed(3))
    assert z.shape == mean.shape == logvar.shape == (2, 4, 4, 4, 4)
    z2 = enc(x, sample_posterior=True, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, z2, rtol=0, atol=0)  # the generator decides the sample
    torch.testing.assert_close(enc(x), mean)  # no sampling: the mean
    eps = (z - mean) / torch.exp(0.5 * logvar)
    assert 0.7 < float(eps.std()) < 1.3
    assert dec(z).shape == (2, 1, 16, 16, 16)
    with pytest.raises(ShapeError, match="divisible by 4"):
        enc(torch.zeros(1, 1, 10, 16, 16))


def test_occupancy_to_voxels_and_empty_decode():
    logits = torch.full((2, 1, 8, 8, 8), -1.0)
    pts = {(0, 1, 2, 3), (0, 7, 0, 0), (1, 4, 4, 4)}
    for b, x, y, z in pts:
        logits[b, 0, x, y, z] = 0.5 + x
    v = occupancy_to_voxels(logits)
    assert v.resolution == 8 and v.batch_size == 2 and v.counts.tolist() == [2, 1]
    assert {tuple(r) for r in v.coords.tolist()} == pts
    torch.testing.assert_close(v.feats[:, 0], torch.tensor([0.5 + r[1] for r in v.coords.tolist()]))
    logits[1] = -2.0
    with pytest.raises(DataError, match=r"^chair_07: sparse-structure decode is empty: no voxel of the 8\^3 grid") as e:
        occupancy_to_voxels(logits, names=["table_01", "chair_07"])
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"^object 1: "):
        occupancy_to_voxels(logits)


def test_ss_vae_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(2, 1, 4, 4, 4, generator=g), (torch.rand(2, 1, 4, 4, 4, generator=g) > 0.5).float()
    mean, logvar = torch.randn(2, 3, 2, 2, 2, generator=g), torch.randn(2, 3, 2, 2, 2, generator=g)
    out = ss_vae_loss(logits, y, mean, logvar, "dice", 1e-3)
    p, yd = torch.sigmoid(logits.double()).flatten().tolist(), y.double().flatten().tolist()
    inter = sum(a * b for a, b in zip(p, yd))
    dice = 1 - (2 * inter + 1) / (sum(p) + sum(yd) + 1)
    kl = sum(0.5 * (m * m + math.exp(lv) - lv - 1) for m, lv in zip(mean.flatten().tolist(), logvar.flatten().tolist())) / mean.numel()
    assert out.recon.item() == pytest.approx(dice, rel=1e-5) and out.kl.item() == pytest.approx(kl, rel=1e-5)
    assert out.loss.item() == pytest.approx(dice + 1e-3 * kl, rel=1e-5)
    bce = ss_vae_loss(logits, y, mean, logvar, "bce").recon
    torch.testing.assert_close(bce, torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits), y))


def test_ss_vae_training_lowers_dice_kl():
    enc, dec = _model("ss_enc_tiny"), _model("ss_dec_tiny")
    occ = _occupancy([0, 1])  # ~3.5 % of 16^3 occupied
    opt = torch.optim.AdamW(list(enc.parameters()) + list(dec.parameters()), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(18):
        z, mean, logvar = enc(occ, sample_posterior=True, return_raw=True, generator=g)
        out = ss_vae_loss(dec(z), occ, mean, logvar, "dice", 1e-3)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert sum(losses[-4:]) / 4 < 0.85 * sum(losses[:4]) / 4, losses


# ---------------------------------------------------------------------------------- SS flow
@pytest.mark.parametrize("preset", ["ss_flow_tiny", "ss_flow_tiny_shared_p2"])
def test_flow_starts_at_zero_velocity_and_buffer_is_persistent(preset):
    model = _model(preset)
    x, cond = torch.randn(2, 4, 8, 8, 8), torch.randn(2, 3, 16)
    v = model(x, torch.tensor([10.0, 900.0]), cond)
    assert v.shape == x.shape and v.abs().max() == 0  # zero-init out_layer (and adaLN)
    assert "pos_emb" in model.state_dict() and "pos_emb" not in dict(model.named_parameters())
    assert model.pos_emb.shape == (model.num_tokens, 32)
    with pytest.raises(ShapeError, match=r"cond: expected \(B=2, S, 16\)"):
        model(x, torch.zeros(2), torch.randn(2, 3, 8))


def test_flow_block_gate_and_condition_paths():
    """With nonzero weights the velocity depends on the condition and the time, and a block whose
    adaLN output is zero passes only its (ungated) cross-attention branch."""
    model = _model("ss_flow_tiny")
    torch.nn.init.normal_(model.out_layer.weight, std=0.1)
    for b in model.blocks:
        torch.nn.init.normal_(b.adaLN_modulation[1].weight, std=0.1)
    x, c1, c2 = torch.randn(1, 4, 8, 8, 8), torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    with torch.no_grad():
        va, vb, vc = model(x, torch.tensor([100.0]), c1), model(x, torch.tensor([100.0]), c2), model(x, torch.tensor([700.0]), c1)
        assert (va - vb).abs().max() > 1e-4 and (va - vc).abs().max() > 1e-4
        blk = model.blocks[0]
        h = torch.randn(1, 5, 32)
        zero_mod = torch.zeros(1, 32)
        torch.nn.init.zeros_(blk.adaLN_modulation[1].weight)
        expect = h + blk.cross_attn(blk.norm2(h), c1)
        torch.testing.assert_close(blk(h, zero_mod, c1), expect)


def test_flow_training_lowers_loss_on_vae_latents():
    """The SS flow learns velocities of latent grids with recon3d's rectified-flow objective."""
    torch.manual_seed(0)
    enc = _model("ss_enc_tiny")
    flow = _model("ss_flow_tiny")
    with torch.no_grad():  # 16^3 occupancy -> 4 x 4^3 latent; the tiny flow runs on 8^3: upsample
        lat = torch.nn.functional.interpolate(enc(_occupancy([0, 1, 2, 3])), scale_factor=2)
        lat = (lat - lat.mean()) / lat.std()
    cond = torch.randn(4, 3, 16)
    obj = RectifiedFlowObjective.trellis()
    opt = torch.optim.AdamW(flow.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        out = obj.loss(flow, lat, cond, neg_cond=torch.zeros_like(cond), generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6, losses


def test_flow_runs_under_the_euler_sampler_with_cfg():
    """The model's call signature is the sampler's (x_t, t * 1000, cond); a fresh model (v = 0)
    leaves the noise unchanged, a perturbed one moves it, with TRELLIS's SS settings (CFG 7.5)."""
    from recon3d.models.flow import FlowEulerSampler

    model = _model("ss_flow_tiny").eval()
    sampler = FlowEulerSampler(steps=3, rescale_t=3.0, cfg_strength=7.5)
    noise, cond = torch.randn(2, 4, 8, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(2, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(sampler.sample(model, noise, cond).samples, noise, rtol=0, atol=0)
        torch.nn.init.normal_(model.out_layer.weight, std=0.05)
        out = sampler.sample(model, noise, cond).samples
    assert out.shape == noise.shape and torch.isfinite(out).all() and (out - noise).abs().max() > 1e-3
