"""MultiViewDiffusionModule: trains on the synthetic set's fixed layout, samples views at the
generator's cameras, reloads and resumes exactly (its own tests: it is a generator, outside the
conformance suite -- tests/reliability/harness.py ``reconstructs_3d``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recon3d.data.datamodule import ReconDataModule
from recon3d.data.synthetic import SyntheticDataset
from recon3d.errors import ConfigError
from recon3d.methods.mv_diffusion import MultiViewDiffusionModule
from recon3d.models.multiview.diffusion import MultiViewDiffusion

REPO = Path(__file__).resolve().parents[2]
TINY = dict(num_views=4, resolution=16, block_out_channels=(16, 32), attention_heads=2, cross_attention_dim=32,
            norm_num_groups=8, token_patch=4, num_inference_steps=3)


def _data(tmp_path, **over):
    ds = dict(num_objects=4, views_per_object=4, resolution=16, fov_deg=49.1, elevation_range=(0.0, 0.0), camera_layout="fixed",
              num_surface_points=0, num_sdf_points=0, mesh_resolution=0, cache_dir=str(tmp_path / "cache"))
    ds.update(over)
    dm = ReconDataModule(SyntheticDataset(**ds), num_val_objects=1, num_test_objects=1, num_input_views=1, num_target_views=3,
                         supervise_inputs=True, train_view_sampling="fixed", eval_view_sampling="fixed", with_geometry=False,
                         batch_size=2)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _module(**kw):
    torch.manual_seed(0)
    return MultiViewDiffusionModule(MultiViewDiffusion(**TINY), lr=2e-3, **kw)


def test_loss_falls(tmp_path):
    dm = _data(tmp_path)
    batch = next(iter(dm.train_dataloader()))
    m = _module()
    opt = m.configure_optimizers()

    def held_out():  # fixed draws (seed 999) that training never uses
        m.seed = 999
        with torch.no_grad():
            return float(m.training_losses(batch)["loss"])

    before = held_out()
    for step in range(8):
        m.seed = step  # fresh timesteps / noise / dropout every step, as global_step does in a run
        loss = m.training_losses(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out()
    assert after < 0.7 * before, (before, after)


def test_targets_and_generated_views_are_the_generators_cameras(tmp_path):
    dm = _data(tmp_path)
    batch = next(iter(dm.train_dataloader()))
    m = _module().eval()
    want = m.net.cameras(len(batch))
    torch.testing.assert_close(batch.targets.cameras.c2w, want.c2w, atol=1e-5, rtol=0)
    views = m.generate(batch)
    assert views.images.shape == (len(batch), 4, 3, 16, 16)
    assert torch.equal(views.cameras.c2w, want.c2w) and torch.equal(views.cameras.K, want.K)
    # an object's sample comes from its own seed: the same alone as in its batch
    alone = m.generate(batch_select(batch, 1)).images
    torch.testing.assert_close(alone[0], views.images[1], atol=1e-5, rtol=0)


def batch_select(batch, i):
    from recon3d.data.batch import Batch

    return Batch([batch.object_ids[i]], batch.inputs.select(i), batch.targets.select(i))


def test_wrong_layout_is_one_config_line(tmp_path):
    dm = _data(tmp_path, camera_layout="random")
    batch = next(iter(dm.train_dataloader()))
    with pytest.raises(ConfigError) as e:
        _module().training_losses(batch)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "not the generator's cameras" in msg and "camera_layout: fixed" in msg
    with pytest.raises(ConfigError, match="reconstructs no 3D"):
        _module().reconstruct(batch)
    with pytest.raises(ConfigError, match="condition_dropout"):
        MultiViewDiffusionModule(MultiViewDiffusion(**TINY), condition_dropout=1.0)


def test_condition_dropout_zeroes_whole_objects(tmp_path):
    dm = _data(tmp_path)
    batch = next(iter(dm.train_dataloader()))
    m = _module(condition_dropout=0.5)
    seen = []
    h = m.net.unet.register_forward_pre_hook(lambda mod, a, k: seen.append(k["encoder_hidden_states"]), with_kwargs=True)
    try:
        for step in range(6):
            m.seed = step
            m.training_losses(batch)
    finally:
        h.remove()
    per_obj = torch.stack([s.reshape(2, 4, -1).abs().amax(dim=(1, 2)) for s in seen])  # (steps, B)
    dropped = per_obj == 0
    assert dropped.any() and (~dropped).any()  # p = 0.5 over 12 draws


def test_outside_the_conformance_suite_only_because_it_says_so():
    from tests.reliability.harness import CONFIGS, reconstructs_3d

    assert not reconstructs_3d(REPO / "configs/mv_diffusion_cpu.yaml")
    assert MultiViewDiffusionModule.RECONSTRUCTS_3D is False
    assert all(reconstructs_3d(REPO / c.config) for c in CONFIGS)  # every other *_cpu config is still discovered
    assert {"gtr", "m3d"} <= {c.name for c in CONFIGS} and "mv_diffusion" not in {c.name for c in CONFIGS}


@pytest.mark.slow
def test_cli_fit_resume_test_predict(tmp_path):
    """Through the real CLI: fit 4 steps; fit 2 + resume to 4 gives bit-identical weights; test
    writes the metric table; predict writes every test object's views and cameras."""
    from tests.reliability.harness import assert_bit_identical, ckpt_dir, load_ckpt, run, tail

    base = ["-c", str(REPO / "configs/mv_diffusion_cpu.yaml"), "-c", str(REPO / "configs/mv_diffusion/tiny.yaml"),
            "--data.dataset.init_args.cache_dir", str(tmp_path / "cache")]

    def fit(d, *extra):
        p = run(["fit", *base, "--trainer.logger.init_args.save_dir", str(d), *extra], cwd=tmp_path)
        assert p.returncode == 0, tail(p)

    fit(tmp_path / "full")
    fit(tmp_path / "half", "--trainer.max_steps", "2")
    fit(tmp_path / "half", "--ckpt_path", str(ckpt_dir(tmp_path / "half") / "last.ckpt"))
    full, resumed = (load_ckpt(ckpt_dir(tmp_path / d) / "last.ckpt") for d in ("full", "half"))
    assert full["global_step"] == resumed["global_step"] == 4
    assert_bit_identical(full["state_dict"], resumed["state_dict"])

    ckpt = str(ckpt_dir(tmp_path / "full") / "last.ckpt")
    p = run(["test", *base, "--trainer.logger.init_args.save_dir", str(tmp_path / "t"), "--ckpt_path", ckpt], cwd=tmp_path)
    assert p.returncode == 0, tail(p)
    table = json.loads(next((tmp_path / "t").rglob("metrics.json")).read_text())
    assert table["num_objects"] == 2 and all(0 < r["psnr"] < 100 for r in table["per_object"])

    p = run(["predict", *base, "--trainer.logger.init_args.save_dir", str(tmp_path / "p"), "--ckpt_path", ckpt], cwd=tmp_path)
    assert p.returncode == 0, tail(p)
    from PIL import Image

    cams = sorted((tmp_path / "p").rglob("cameras.json"))
    assert len(cams) == 2
    for c in cams:
        meta = json.loads(c.read_text())
        assert meta["projection"] == "perspective" and len(meta["c2w"]) == 4 and meta["width"] == 16
        for k in range(4):
            with Image.open(c.parent / f"view_{k}.png") as im:
                assert im.size == (16, 16)
