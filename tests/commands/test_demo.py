"""``recon3d demo`` end to end at a tiny size: summary table, summary.json, counted export skips;
and the demo config's two-process training (DDP on CPU) followed by a one-process test and export."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from recon3d.cli import main

#: the demo at a size that runs in seconds (configs/gtr_demo.yaml otherwise)
TINY = ["--data.dataset.init_args.num_objects=8", "--data.num_test_objects=2", "--data.batch_size=2",
        "--data.dataset.init_args.views_per_object=8", "--model.init_args.export_resolution=16",
        "--model.init_args.turntable_frames=0", "--model.init_args.refine=null"]


def test_demo_runs_and_prints_a_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RECON3D_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    # In-process: one process (the config's DDP would start a second rank by re-running argv, pytest's here).
    rc = main(["demo", "--out", str(out), "--steps", "2", "--", "--trainer.devices=1", "--trainer.strategy=auto", *TINY])
    assert rc == 0
    text = capsys.readouterr().out
    assert "held-out objects: 2" in text and "PSNR (dB)" in text and "silhouette IoU" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["held_out_objects"] == 2
    assert set(summary["test_metrics"]) >= {"test/psnr", "test/ssim", "test/mask_iou"}
    exports = summary["exports"]
    assert len(exports) == 2
    # Two steps leave no surface at the mesh level: each object is a counted skip with its reason,
    # not the end of the demo; anything exported is on disk.
    from pathlib import Path

    predict_dir = Path(summary["metrics_csv"]).parent / "predict"  # where the run's predict step writes
    assert f"files under {predict_dir}" in text
    assert "grids        " + str(Path(summary["metrics_csv"]).parent / "test_grid_") in text  # the held-out objects' grid is the one named
    for obj in exports.values():
        if "skipped" not in obj:
            assert Path(obj["mesh.glb"]).is_file() and Path(obj["mesh.obj"]).is_file()
            assert predict_dir in Path(obj["mesh.glb"]).parents
        else:
            assert obj["skipped"].startswith("no surface")
    skipped = sum("skipped" in o for o in exports.values())
    if skipped:
        assert f"{skipped} skipped: no surface yet" in text


@pytest.mark.ddp
def test_demo_trains_on_two_processes_then_evaluates_every_object_in_one(tmp_path):
    from tests.reliability.harness import RECON3D, clean_env

    out = tmp_path / "demo"
    env = clean_env(RECON3D_CACHE=str(tmp_path / "cache"))
    env.pop("OMP_NUM_THREADS")  # the demo sets one thread per rank itself
    p = subprocess.run([str(RECON3D), "demo", "--out", str(out), "--steps", "4", "--", *TINY, "--trainer.val_check_interval=2"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "on 2 processes x 1 thread" in p.stdout, p.stdout
    assert "sync_dist" not in p.stderr and "Traceback" not in p.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4
    # both test objects went through the one evaluator (each rank alone would have seen one)
    assert summary["held_out_objects"] == 2 and len(summary["exports"]) == 2
    run = Path(summary["metrics_csv"]).parent
    assert len({r["object_id"] for r in csv.DictReader(open(run / "test" / "per_object.csv"))}) == 2
    # the evaluation trainer carries the training's step: the test grid and the logged test row name it
    assert (run / "test_grid_epoch0004_step0000004.png").is_file(), sorted(x.name for x in run.iterdir())
    # the validation grids of the DDP training gather both ranks' objects: the height of the test
    # grid's two objects, the same views (rank 0 held one of the two validation objects)
    from PIL import Image

    vals = sorted(run.glob("val_grid_*.png"))
    assert len(vals) == 2, sorted(x.name for x in run.iterdir())
    assert {Image.open(v).height for v in vals} == {Image.open(run / "test_grid_epoch0004_step0000004.png").height}
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert any(r.get("train/nonfinite_steps") for r in rows), "the training rows of metrics.csv were lost"
    test_rows = [r for r in rows if r.get("test/psnr")]
    assert len(test_rows) == 1 and test_rows[0]["step"] == "4"
    assert len(list((run / "checkpoints").glob("*.ckpt"))) >= 1
