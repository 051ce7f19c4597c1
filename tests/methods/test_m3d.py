"""M3DModule: two-stage supervision on the synthetic single-view set, the four ablation configs,
the CLI end to end, per-class test CSV, export, and bad input surfaced as one-line errors."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from recon3d.cli import main as cli_main
from recon3d.cli import run_lightning_cli
from recon3d.errors import DataError
from tests.data.test_front3d import IMGID, H, W, write_front3d

ROOT = Path(__file__).resolve().parents[2]
CPU_CFG = str(ROOT / "configs/m3d_cpu.yaml")
# Smaller than configs/m3d_cpu.yaml: fewer objects and rays, so the whole file stays well under a minute.
TINY = [
    "--data.dataset.init_args.num_objects", "5", "--data.dataset.init_args.views_per_object", "2",
    "--data.dataset.init_args.num_surface_points", "512", "--data.dataset.init_args.num_sdf_points", "1024",
    "--data.num_val_objects", "1", "--data.num_test_objects", "1",
    "--model.init_args.num_render_rays", "32", "--model.init_args.n_samples", "12", "--model.init_args.n_importance", "0",
    "--model.init_args.num_sdf_samples", "512", "--model.init_args.num_surface_rays", "128",
    "--model.init_args.mesh_resolution", "24", "--model.init_args.export_resolution", "24",
    "--model.init_args.evaluation.init_args.num_points", "512",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    # LightningCLI warns when pytest's own argv is present beside the args it is given
    monkeypatch.setattr("sys.argv", ["recon3d"])


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("synthetic_cache"))


def _cli(cache: str, *extra: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_lightning_cli(["-c", CPU_CFG, *TINY, "--data.dataset.init_args.cache_dir", cache, *extra], run=False)


def _batch(cli):
    dm = cli.datamodule
    dm.prepare_data()
    return next(iter(dm.train_dataloader()))


def _train(model, batch, steps: int, lr: float = 5e-4) -> list[dict[str, float]]:
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    hist = []
    for _ in range(steps):
        terms = model.training_losses(batch)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        hist.append({k: float(v.detach()) for k, v in terms.items()})
    return hist


@pytest.fixture(scope="module")
def m3d(cache):
    cli = _cli(cache)
    return cli.model, _batch(cli)


def test_stage1_sdf_loss_falls(m3d):
    model, batch = m3d
    assert len(batch) == 2 and batch.inputs.images.shape[1] == 1 and batch.targets.images.shape[1] == 1
    model.stage = "sdf"
    hist = _train(model, batch, 20)
    assert all(h["stage"] == 1.0 and "rgb" not in h for h in hist)
    first, last = hist[0]["sdf"], np.mean([h["sdf"] for h in hist[-5:]])
    assert last < 0.6 * first, (first, last)


def test_stage2_adds_rendering_losses_and_falls(m3d):
    model, batch = m3d
    model.stage = "full"
    hist = _train(model, batch, 20)
    for k in ("sdf", "rgb", "depth", "normal", "beta"):
        assert all(k in h and np.isfinite(h[k]) for h in hist), k
    assert hist[0]["stage"] == 2.0
    # the total loss weights the rendering terms by the paper's eq. 13 (α=1, β=γ=0.1, δ=0.01)
    h = hist[0]
    assert h["loss"] == pytest.approx(h["sdf"] + 0.1 * h["rgb"] + 0.1 * h["depth"] + 0.01 * h["normal"], rel=1e-4)
    first = np.mean([h["loss"] for h in hist[:3]])
    last = np.mean([h["loss"] for h in hist[-3:]])
    assert last < 0.8 * first, (first, last)
    assert np.mean([h["normal"] for h in hist[-3:]]) < np.mean([h["normal"] for h in hist[:3]])


def test_curriculum_factor_and_lr_schedule(m3d):
    model, _ = m3d
    model.stage = "auto"
    assert model.curriculum_factor() == 0.0  # no trainer: epoch/step 0 < full_loss_start
    model.full_loss_start, model.full_loss_ramp = 0, 4
    assert model.curriculum_factor() == pytest.approx(0.25)
    model.full_loss_start = 100
    assert isinstance(model.configure_optimizers(), torch.optim.Optimizer)
    # lr 1e-3 until step 150, then 1e-4 (the paper's step decay, in steps at CPU scale).
    assert model.lr_factor(149) == 1.0
    assert model.lr_factor(150) == pytest.approx(1e-4 / 1e-3)


def test_depth_source_errors_name_the_command(m3d):
    model, batch = m3d
    model.depth_source = "prior"
    try:
        with pytest.raises(DataError, match="recon3d data depth"):
            model.training_losses(batch)
        batch.extras["depth_prior"] = batch.inputs.depths[:, 0, :, :16, :16] + 1  # a lower-res prior is resized
        assert model.depth_input(batch).shape == (2, 1, 32, 32)
    finally:
        batch.extras.pop("depth_prior", None)
        model.depth_source = "auto"


def test_render_geometry_and_export(m3d, tmp_path):
    model, batch = m3d
    model.eval()
    out = model.render_views(batch, batch.targets.cameras)
    assert out["rgb"].shape == (2, 1, 3, 32, 32) and torch.isfinite(out["rgb"]).all()
    geo = model.predict_geometry(batch)
    assert geo["points"].shape == (2, 512, 3) and torch.isfinite(geo["points"]).all()
    files = model.export_object(batch, 0, tmp_path)
    assert Path(files["mesh.glb"]).stat().st_size > 0 and Path(files["mesh.obj"]).stat().st_size > 0
    model.train()


@pytest.mark.parametrize("name", ["baseline", "exp1", "exp2", "m3d"])
def test_ablation_configs_build_and_step(cache, name):
    # SSR's deep encoder, CPU-sized; a new class_path starts from its defaults, so the CPU shallow
    # encoder's 128 channels and the CPU ROI size are given explicitly
    small = [] if name == "m3d" else ["--model.init_args.deep.init_args.width", "8", "--model.init_args.deep.init_args.in_channels", "128",
                                      "--model.init_args.deep.init_args.roi_size", "16"]
    cli = _cli(cache, "-c", str(ROOT / f"configs/m3d/{name}.yaml"), *small)
    net = cli.model.net
    want = {"baseline": ("ResNet18DeepEncoder", False, False), "exp1": ("ResNet18DeepEncoder", True, False),
            "exp2": ("ResNet18DeepEncoder", True, True), "m3d": ("SelectiveAttentionDeepEncoder", True, True)}[name]
    assert (type(net.deep).__name__, net.shallow.layer1[0].enhanced, net.depth is not None) == want
    cli.model.stage = "full"
    hist = _train(cli.model, _batch(cli), 1)
    assert np.isfinite(hist[0]["loss"]) and "rgb" in hist[0]


@pytest.mark.parametrize("name", ["baseline"])  # the other three compose the same way (tested at CPU scale above)
def test_paper_scale_config_with_an_ablation_parses(name, capsys):
    with pytest.raises(SystemExit) as e:  # --print_config parses (no data needed) and exits 0
        cli_main(["fit", "-c", str(ROOT / "configs/m3d.yaml"), "-c", str(ROOT / f"configs/m3d/{name}.yaml"), "--print_config"])
    assert e.value.code in (0, None)
    cfg = capsys.readouterr().out
    deep = "SelectiveAttentionDeepEncoder" if name == "m3d" else "ResNet18DeepEncoder"
    assert f"class_path: recon3d.models.m3d.{deep}" in cfg and "lr: 6.0e-05" in cfg and "roi_size: 64" in cfg
    assert ("depth_encoder: null" in cfg) == (name in ("baseline", "exp1"))
    assert ("block: basic" in cfg) == (name == "baseline")


def test_fit_and_test_through_the_cli(cache, tmp_path, capsys):
    common = ["-c", CPU_CFG, *TINY, "--data.dataset.init_args.cache_dir", cache,
              "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    # curriculum by step: stage 1 for step 0, stage 2 (rendering losses) from step 1
    rc = cli_main(["fit", *common, "--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1",
                   "--model.init_args.full_loss_start", "1", "--model.init_args.full_loss_ramp", "0"])
    assert rc == 0, capsys.readouterr().err
    metrics = next(tmp_path.rglob("metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    stages = [float(r["train/stage"]) for r in rows if r.get("train/stage")]
    assert stages == [1.0, 2.0, 2.0]
    assert any(r.get("train/rgb") for r in rows)
    rc = cli_main(["test", *common, "--model.init_args.class_pattern", r"synth_(\d+)_"])
    assert rc == 0, capsys.readouterr().err
    per_class = next(tmp_path.rglob("per_class.csv"))
    table = list(csv.DictReader(per_class.open()))
    assert [r["class"] for r in table] == ["0", "mean (over classes)", "mean (over objects)"]
    assert all(np.isfinite(float(table[0][k])) for k in ("cd", "fscore", "nc"))


# ---------------------------------------------------------------------- 3D-FRONT through the CLI


def _front3d_cfg(tmp_path: Path, root: Path, cache_dir: Path | None) -> str:
    cfg = {
        "model": {"init_args": {"num_classes": 9, "depth_source": "prior", "num_surface_rays": 0, "stage": "full"}},
        "data": {
            "dataset": {"class_path": "recon3d.data.formats.front3d.Front3DDataset",
                        "init_args": {"root": str(root), "split": "split.json", "num_sdf_points": 256,
                                      "depth_dir": None if cache_dir is None else str(cache_dir), "require_depth": cache_dir is not None}},
            "num_val_objects": 0, "num_test_objects": 0, "batch_size": 1,
        },
        "trainer": {"max_steps": 1, "default_root_dir": str(tmp_path / "out"), "logger": False},
    }
    path = tmp_path / f"front3d_{root.name}.yaml"
    path.write_text(json.dumps(cfg))
    return str(path)


def _fit_front3d(tmp_path: Path, root: Path, cache_dir: Path | None, capsys) -> tuple[int, str]:
    rc = cli_main(["fit", "-c", CPU_CFG, *TINY, "-c", _front3d_cfg(tmp_path, root, cache_dir)])
    return rc, capsys.readouterr().err.strip()


def test_front3d_trains_and_bad_input_is_one_line(tmp_path, capsys):
    root, cache_dir = tmp_path / "ok", tmp_path / "depth_cache"
    write_front3d(root)
    (cache_dir / "test/rgb").mkdir(parents=True)
    np.save(cache_dir / "test/rgb/000751_rgb_003848.npy", np.random.default_rng(0).random((H, W)).astype(np.float32))
    rc, err = _fit_front3d(tmp_path, root, cache_dir, capsys)
    assert rc == 0, err  # ROI box, class code, cube transform and the cached prior all go through a step

    shutil.rmtree(cache_dir)  # depth missing from the cache: the error names the command that makes it
    rc, err = _fit_front3d(tmp_path, root, cache_dir, capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("recon3d: error:")]
    assert rc == 2 and len(lines) == 1 and "recon3d data depth" in lines[0] and IMGID.rsplit(".")[0] in lines[0], err

    roi = tmp_path / "roi"
    write_front3d(roi, box_in_image=False)
    rc, err = _fit_front3d(tmp_path, roi, None, capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("recon3d: error:")]
    assert rc == 2 and len(lines) == 1 and "outside the" in lines[0], err

    grid = tmp_path / "grid"
    write_front3d(grid, grid_shape=(32, 32, 32))
    rc, err = _fit_front3d(tmp_path, grid, None, capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("recon3d: error:")]
    assert rc == 2 and len(lines) == 1 and "voxels.npy.gz" in lines[0] and "(64, 64, 64)" in lines[0], err


def test_per_class_rows_group_by_class_code(m3d):
    from types import SimpleNamespace

    model, _ = m3d
    code = torch.zeros(3, 9)
    code[0, 4] = code[1, 4] = code[2, 0] = 1  # chair, chair, table
    fake = SimpleNamespace(extras={"class_code": code}, object_ids=["a", "b", "c"])
    model._object_class = {oid: model._class_of(fake, i) for i, oid in enumerate(fake.object_ids)}
    rows = [{"object_id": "a", "cd": 1.0, "fscore": 50.0, "nc": 0.8}, {"object_id": "b", "cd": 3.0, "fscore": 70.0, "nc": 0.6},
            {"object_id": "c", "cd": 8.0, "fscore": 10.0, "nc": 0.5}]
    table = {r["class"]: r for r in model.per_class_rows(rows)}
    assert list(table) == ["table", "chair", "mean (over classes)", "mean (over objects)"]  # SSR's class order
    assert table["chair"]["cd"] == 2.0 and table["chair"]["num_objects"] == 2 and table["table"]["fscore"] == 10.0
    assert table["mean (over classes)"]["cd"] == 5.0 and table["mean (over objects)"]["cd"] == 4.0


def test_predict_encodes_once_per_batch(m3d, tmp_path, monkeypatch):
    """Reconstruct once: predict_step encodes the batch once, not once per exported object (B²)."""
    model, batch = m3d
    calls = []
    real = model.net.encode
    monkeypatch.setattr(model.net, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    model._export_root = tmp_path
    model.eval()
    with torch.inference_mode():
        files = model.predict_step(batch, 0)
    del model._export_root
    model.train()
    assert len(calls) == 1 and len(files) == len(batch) == 2
    assert all(Path(f["mesh.glb"]).stat().st_size > 0 for f in files)
