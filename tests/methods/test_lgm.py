"""LGMModule (recon3d.methods.lgm): training on the tiny config, the frame round trip, the
one-cycle schedule against torch's OneCycleLR, bad input, and the 3DGS export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recon3d.data.batch import Batch, Views
from recon3d.data.cameras import Cameras
from recon3d.errors import DataError, ShapeError
from recon3d.methods.lgm import LGMModule, one_cycle_lr_factor
from recon3d.models.lgm import LGMNetwork, normalize_cameras
from recon3d.render import render

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The model and data of configs/lgm_cpu.yaml + configs/lgm/reliability.yaml (the test size)."""
    from recon3d.cli import run_lightning_cli

    cache = tmp_path_factory.mktemp("lgm_cache")
    cli = run_lightning_cli(["-c", str(REPO / "configs/lgm_cpu.yaml"), "-c", str(REPO / "configs/lgm/reliability.yaml"),
                             "--data.dataset.init_args.cache_dir", str(cache), "--trainer.logger", "false"], run=False)
    dm = cli.datamodule
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    return cli.model, batch


def _fresh(**kw) -> LGMModule:
    torch.manual_seed(0)
    return LGMModule(network=LGMNetwork("tiny", num_views=4), lambda_lpips=0.0, **kw)


def test_loss_falls_over_a_few_steps(tiny):
    model, batch = tiny
    torch.manual_seed(0)
    model = _fresh(lr=1e-2, augment=True)
    opt = model.configure_optimizers()
    model.train()
    losses = []
    for _ in range(5):
        terms = model.training_losses(batch)
        assert set(terms) >= {"rgb", "mask", "psnr", "loss"} and "lpips" not in terms
        opt.zero_grad()
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(terms["loss"].detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-2:]) < 0.7 * losses[0], losses


def test_reconstruction_is_in_the_world_frame(tiny):
    """The Gaussians the module returns, rendered at world cameras, equal the network's
    canonical-frame Gaussians rendered at the same cameras normalised with the same transform."""
    model, batch = tiny
    model.eval()
    with torch.no_grad():
        rec = model.reconstruct(batch)
        world = model.render_reconstruction(rec, batch.targets.cameras)
        both = Cameras.cat([batch.inputs.cameras, batch.targets.cameras], dim=1)
        canon_all, _ = normalize_cameras(both, 1.5, reference=0, rescale=True)
        V = batch.inputs.cameras.batch_shape[1]
        canon_in, canon_tgt = canon_all[:, :V], canon_all[:, V:]
        g = model.net(batch.inputs.images, canon_in)
        canon = render(g, canon_tgt, "white", backend="torch")
    assert rec.representation.num_gaussians == 4 * 8 * 8  # tiny at 16²: 4 views x 8² Gaussians
    torch.testing.assert_close(world.rgb, canon.rgb, atol=2e-4, rtol=0)
    torch.testing.assert_close(world.alpha, canon.alpha, atol=2e-4, rtol=0)


def test_targets_are_recomposited_on_white():
    g = torch.Generator().manual_seed(0)
    rgb, mask = torch.rand(2, 3, 3, 4, 4, generator=g), torch.rand(2, 3, 1, 4, 4, generator=g)
    bg = torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.5, 0.9]])
    on_bg = rgb * mask + bg.view(2, 1, 3, 1, 1) * (1 - mask)
    torch.testing.assert_close(LGMModule._on_white(on_bg, mask, bg), rgb * mask + (1 - mask))
    white = torch.ones(2, 3)
    assert LGMModule._on_white(on_bg, mask, white) is on_bg


@pytest.mark.parametrize("total,warm", [(100, 30), (10, 3), (5000, 3000)])
def test_one_cycle_matches_torch(total, warm):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=4e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-4, total_steps=total, pct_start=warm / total)
    for step in range(total):
        assert abs(opt.param_groups[0]["lr"] - 4e-4 * one_cycle_lr_factor(step, total, warm)) < 1e-12
        opt.step()
        sched.step()


def test_one_cycle_short_runs():
    # a warm-up as long as the run is clamped to total - 1; warm-up 0 starts at the peak
    assert one_cycle_lr_factor(0, 10, 3000) == pytest.approx(1 / 25)
    assert one_cycle_lr_factor(8, 10, 3000) == pytest.approx(1.0)
    assert one_cycle_lr_factor(0, 10, 0) == pytest.approx(1.0)
    assert one_cycle_lr_factor(9, 10, 0) == pytest.approx(1 / 25 / 1e4)


def test_wrong_number_of_input_views_is_one_shape_error(tiny):
    model, batch = tiny
    three = Views(batch.inputs.images[:, :3], batch.inputs.cameras[:, :3], batch.inputs.masks[:, :3])
    bad = Batch(batch.object_ids, three, batch.targets, background=batch.background)
    for call in (model.reconstruct, model.training_losses):
        with pytest.raises(ShapeError) as err:
            call(bad)
        msg = str(err.value)
        assert "4 input views" in msg and "got 3" in msg and "data.num_input_views" in msg and "\n" not in msg


def test_unposed_inputs_are_one_data_error(tiny):
    model, batch = tiny
    unposed = Batch(batch.object_ids, Views(batch.inputs.images), batch.targets, background=batch.background)
    with pytest.raises(DataError, match="inputs.cameras"):
        model.reconstruct(unposed)


def test_lpips_without_weights_refuses_in_one_line(tmp_path, monkeypatch):
    from recon3d.metrics.lpips import LPIPSWeightsNotFoundError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no hub cache with the VGG backbone
    monkeypatch.delenv("RECON3D_LPIPS_DIR", raising=False)
    with pytest.raises(LPIPSWeightsNotFoundError) as err:
        LGMModule(network=LGMNetwork("tiny"), lambda_lpips=1.0, lpips_weights_dir=str(tmp_path / "empty"))
    msg = str(err.value)
    assert "vgg16-397923af.pth" in msg and "\n" not in msg
    assert LGMModule(network=LGMNetwork("tiny"), lambda_lpips=0.0).lpips is None


def test_bad_options_name_the_key():
    from recon3d.errors import ConfigError

    with pytest.raises(ConfigError, match="model.prob_camera_jitter"):
        LGMModule(network=LGMNetwork("tiny"), lambda_lpips=0.0, prob_camera_jitter=1.5)
    with pytest.raises(ConfigError, match=r"model.betas\[1\]"):
        LGMModule(network=LGMNetwork("tiny"), lambda_lpips=0.0, betas=(0.9, 1.0))


def test_export_writes_a_3dgs_ply_that_round_trips(tiny, tmp_path):
    from plyfile import PlyData

    from recon3d.render.gaussians.ply import load_ply

    model, batch = tiny
    model.eval()
    with torch.no_grad():
        rec = model.reconstruct(batch).select(0)
    g = rec.representation
    # make some Gaussians fall under LGM's pruning threshold, so pruning is exercised
    g.opacities[0, ::3] = 0.001
    files = model.export_reconstruction(rec, tmp_path)
    assert list(files) == ["gaussians.ply"]
    path = Path(files["gaussians.ply"])
    ply = PlyData.read(str(path))
    keep = g.opacities[0] >= 0.005
    assert ply["vertex"].count == int(keep.sum()) < g.num_gaussians
    names = [p.name for p in ply["vertex"].properties]
    assert names[:3] == ["x", "y", "z"] and "f_dc_0" in names and "rot_3" in names
    back = load_ply(path)
    torch.testing.assert_close(back.means[0], g.means[0][keep], atol=1e-6, rtol=0)
    torch.testing.assert_close(back.scales[0], g.scales[0][keep], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(back.opacities[0], g.opacities[0][keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(back.colors[0], g.colors[0][keep], atol=1e-5, rtol=0)
    q_back = torch.nn.functional.normalize(back.quats[0], dim=-1)
    torch.testing.assert_close(q_back, torch.nn.functional.normalize(g.quats[0][keep], dim=-1), atol=1e-5, rtol=0)
    # ply x/y/z read independently of recon3d's reader
    torch.testing.assert_close(torch.tensor(ply["vertex"]["x"]), g.means[0][keep][:, 0], atol=1e-6, rtol=0)


def test_geometry_points_are_opaque_gaussian_centres(tiny):
    model, batch = tiny
    model.eval()
    with torch.no_grad():
        rec = model.reconstruct(batch)
    g = rec.representation
    g.opacities[1] = 0.0  # object 1: nothing above the threshold
    geo = model.reconstruction_geometry(rec, batch)
    assert geo["valid"].tolist() == [True, False]
    P = geo["points"].shape[1]
    assert P == 4096 and "normals" not in geo
    centres = g.means[0]
    # every sampled point is one of object 0's Gaussian centres with opacity >= the threshold
    d = torch.cdist(geo["points"][0], centres, compute_mode="donot_use_mm_for_euclid_dist")
    nearest = d.argmin(1)
    assert d.min(1).values.max() < 1e-6
    assert (g.opacities[0][nearest] >= model.export_min_opacity).all()
    again = model.reconstruction_geometry(rec, batch)
    assert torch.equal(again["points"], geo["points"])  # seeded per object


def test_bf16_autocast_keeps_frames_and_renders_in_float32(tiny):
    """Under bf16 autocast (the GPU configs' precision; CPU autocast here) the U-Net runs in bf16
    while the camera normalisation, the frame change and the rasteriser stay float32."""
    model, batch = tiny
    model.eval()
    with torch.no_grad():
        ref = model.reconstruct(batch).representation
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rec = model.reconstruct(batch)
            out = model.render_reconstruction(rec, batch.targets.cameras)
            terms = model.training_losses(batch)
    g = rec.representation
    assert g.means.dtype == torch.float32 and out.rgb.dtype == torch.float32
    assert all(torch.isfinite(v) for v in terms.values())
    # bf16 network outputs differ a little from float32 ones, the frames do not add to it
    assert (g.means - ref.means).abs().max() < 0.1


def test_targets_on_another_background_without_masks_refuse(tiny):
    model, batch = tiny
    tg = Views(batch.targets.images, batch.targets.cameras)  # no masks
    black = torch.zeros(len(batch), 3)
    unmasked = Batch(batch.object_ids, batch.inputs, tg, background=black)
    model = _fresh(lambda_mask=0.0)
    with pytest.raises(DataError, match="data.background: white"):
        model.training_losses(unmasked)
    white = Batch(batch.object_ids, batch.inputs, tg, background=torch.ones(len(batch), 3))
    assert torch.isfinite(model.training_losses(white)["loss"])
    with pytest.raises(DataError, match="targets.masks"):
        _fresh(lambda_mask=1.0).training_losses(white)
