"""MVBoost's input-view optimisation runs in `recon3d predict` on LGM, configured from YAML."""

from __future__ import annotations

import json
from pathlib import Path

from plyfile import PlyData

from recon3d.cli import main

ROOT = Path(__file__).resolve().parents[2]
BASE = ["-c", str(ROOT / "configs/lgm_cpu.yaml"), "-c", str(ROOT / "configs/lgm/reliability.yaml")]
REFINE = json.dumps({
    "class_path": "recon3d.models.refiners.InputViewRefiner",
    "init_args": {"loss": "ssim_l1", "pose_search": False, "steps": 5, "reg_views": 2, "reg_views_per_step": 1},
})


def test_predict_runs_the_input_view_refiner_and_exports_both_sets(tmp_path):
    """The refiner comes from the command line (a run-time option), runs under Lightning's
    inference-mode predict loop, and both Gaussian sets are written and parse."""
    code = main(["predict", *BASE, "--data.dataset.init_args.cache_dir", str(tmp_path / "cache"),
                 "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.callbacks", "[]",
                 "--model.init_args.refine", REFINE, "--model.init_args.export_min_opacity", "0"])
    assert code == 0
    objs = sorted(p for p in (tmp_path / "run" / "predict").iterdir() if p.is_dir())
    assert objs, "predict wrote no object folder"
    plain, refined = objs[0] / "gaussians.ply", objs[0] / "gaussians_input_view.ply"
    n_plain = PlyData.read(str(plain))["vertex"].count
    n_refined = PlyData.read(str(refined))["vertex"].count
    assert n_plain == n_refined > 0  # no pruning here: the offsets change values, not the set
    a = PlyData.read(str(plain))["vertex"]["f_dc_0"]
    b = PlyData.read(str(refined))["vertex"]["f_dc_0"]
    assert (a != b).any(), "the refined colours equal the feed-forward ones"
