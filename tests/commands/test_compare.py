"""``recon3d compare`` (issue 21): two tiny toy entries end to end, kill + resume without re-running
the finished entry, the best-per-column marks, the protocol checks, and the suite files in
``configs/compare/``.

References: the per-object rows of each run's own ``test/metrics.json`` (means recomputed here),
``git rev-parse HEAD``, the checkpoints' ``global_step`` read with ``torch.load``, file
modification times (a finished entry is not touched by a re-run), PIL for the grid's size.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from recon3d.cli import main
from recon3d.commands import compare as cmp

ROOT = Path(__file__).resolve().parents[2]
TOY = str(ROOT / "configs" / "toy.yaml")
SUITES = sorted((ROOT / "configs" / "compare").glob("*.yaml"))
STEPS = 4

_DATA = {
    "dataset": {"class_path": "recon3d.data.synthetic.SyntheticDataset",
                "init_args": {"num_objects": 7, "views_per_object": 4, "resolution": 12, "num_surface_points": 32,
                              "num_sdf_points": 32, "mesh_resolution": 0}},
    "num_val_objects": 1, "num_test_objects": 2, "num_input_views": 2, "num_target_views": 2,
    "batch_size": 2, "with_geometry": False, "seed": 0,
}
_EVAL = {"class_path": "recon3d.metrics.EvaluationProtocol", "init_args": {"image_metrics": ["psnr", "ssim", "mask_iou"]}}


class CrashAfterStep(L.Callback):
    """Raise right after optimizer step ``step`` (a killed entry, in this process)."""

    def __init__(self, step: int = 2):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated kill after step {self.step}")


def _suite(path: Path, crash: bool = False, **extra) -> Path:
    crash_args = ["--trainer.callbacks+=tests.commands.test_compare.CrashAfterStep", "--trainer.callbacks.init_args.step", "2"]
    doc = {"budget": {"max_steps": STEPS, "val_every": 2, "checkpoint_every": 1}, "data": _DATA, "evaluation": _EVAL,
           "grid_objects": 2,
           "entries": [{"name": "slow_lr", "config": TOY, "overrides": ["--model.init_args.lr", "0.0001"]},
                       {"name": "fast_lr", "config": TOY, "overrides": ["--model.init_args.lr", "0.03", *(crash_args if crash else [])]}],
           **extra}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue()


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory):
    """Run 1: ``fast_lr`` is killed after step 2; run 2 resumes it; run 3 re-runs nothing."""
    tmp = tmp_path_factory.mktemp("compare")
    out = tmp / "out"
    rc1, err1 = _run(["compare", str(_suite(tmp / "suite.yaml", crash=True)), "--out", str(out)])
    first = {"rc": rc1, "err": err1, "slow": _mtimes(out / "runs" / "slow_lr"),
             "failed": (out / "runs" / "fast_lr" / "failed.json").is_file(),
             "fast_step": torch.load(out / "runs" / "fast_lr" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]}
    suite = _suite(tmp / "suite.yaml")
    rc2, err2 = _run(["compare", str(suite), "--out", str(out)])
    second = {"rc": rc2, "err": err2, "slow": _mtimes(out / "runs" / "slow_lr"), "fast": _mtimes(out / "runs" / "fast_lr")}
    rc3, err3 = _run(["compare", str(suite), "--out", str(out)])
    third = {"rc": rc3, "err": err3, "slow": _mtimes(out / "runs" / "slow_lr"), "fast": _mtimes(out / "runs" / "fast_lr")}
    return out, first, second, third


def test_killed_entry_resumes_and_finished_entry_is_not_rerun(killed_then_resumed):
    out, first, second, third = killed_then_resumed
    assert first["rc"] == 1 and first["failed"], first["err"][-2000:]
    assert "fast_lr: failed: RuntimeError: simulated kill after step 2" in first["err"]
    assert 1 <= first["fast_step"] <= 2  # the last checkpoint before the kill
    assert second["rc"] == 0, second["err"][-2000:]
    assert "slow_lr: finished earlier" in second["err"]
    assert second["slow"] == first["slow"]  # nothing of the finished entry was rewritten
    done = json.loads((out / "runs" / "fast_lr" / "done.json").read_text())
    assert done["resumed_from_step"] == first["fast_step"] and done["steps"] == STEPS
    assert not (out / "runs" / "fast_lr" / "failed.json").exists()
    ckpt = torch.load(out / "runs" / "fast_lr" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == STEPS
    assert third["rc"] == 0 and third["slow"] == second["slow"] and third["fast"] == second["fast"]
    assert third["err"].count("finished earlier") == 2


def test_every_file_and_the_best_marks(killed_then_resumed):
    out, *_ = killed_then_resumed
    for rel in ("results.json", "results.md", "plots/metrics_vs_step.png", "plots/per_object.png", "grid.png",
                "environment.json", "configs/slow_lr.yaml", "configs/fast_lr.yaml"):
        assert (out / rel).is_file() and (out / rel).stat().st_size > 0, rel
    doc = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert doc["metrics"][:2] == ["psnr", "ssim"] and "mask_iou" in doc["metrics"]
    for name, e in doc["entries"].items():
        assert e["status"] == "done" and e["steps"] == STEPS
        test = json.loads((out / "runs" / name / "test" / "metrics.json").read_text())
        ids = [r["object_id"] for r in test["per_object"]]
        assert len(ids) == 2 and ids == [r["object_id"] for r in e["per_object"]]
        for m in doc["metrics"]:
            mean = sum(r[m] for r in test["per_object"]) / len(ids)  # independent aggregation
            assert math.isclose(e["metrics"][m], mean, rel_tol=1e-6, abs_tol=1e-9), (name, m)
        assert e["curves"]["psnr"] and all(s <= STEPS for s, _ in e["curves"]["psnr"])
    # the same held-out objects for both entries
    assert [r["object_id"] for r in doc["entries"]["slow_lr"]["per_object"]] == [r["object_id"] for r in doc["entries"]["fast_lr"]["per_object"]]
    # best per column: the larger value for these higher-is-better metrics, bold in its row only
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[4:-1]] for ln in md.splitlines()
            if ln.startswith("| ") and ln.split("|")[1].strip() in doc["entries"]}
    for j, m in enumerate(doc["metrics"]):
        vals = {n: doc["entries"][n]["metrics"][m] for n in rows}
        winner = max(vals, key=vals.get)
        assert doc["best"][m] == sorted(n for n, v in vals.items() if v == vals[winner])
        for n in rows:
            assert rows[n][j].startswith("**") == (n in doc["best"][m]), (m, n, rows[n][j])
    assert "↑" in md and "## Protocol" in md and "Aggregation" in md and "max_steps 4" in md
    # grid: per object a truth row + a row per entry, each (input 0 + 2 targets) wide
    from PIL import Image

    with Image.open(out / "grid.png") as im:
        w, h = im.size
    cell = 12 * 8 + 4  # 12 px views shown x8 (>= 96 px) plus 2 px padding on each side
    assert h == 2 * 3 * cell and w > 3 * cell
    env = json.loads((out / "environment.json").read_text())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert env["git"]["commit"] == head and torch.__version__.startswith(env["packages"]["torch"].split("+")[0])
    resolved = yaml.safe_load((out / "configs" / "fast_lr.yaml").read_text())
    assert resolved["model"]["init_args"]["lr"] == 0.03 and resolved["trainer"]["max_steps"] == STEPS


# ---------------------------------------------------------------------- bad input
def _one_line_error(argv: list[str], *needles: str) -> None:
    rc, err = _run(argv)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("recon3d: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_bad_input_is_one_line(tmp_path):
    _one_line_error(["compare", "--configs", "configs/no_such.yaml", TOY, "--out", str(tmp_path / "o")], "no_such.yaml", "no such file")
    suite = _suite(tmp_path / "s.yaml")
    doc = yaml.safe_load(suite.read_text())
    doc["entries"][1]["config"] = "configs/missing_method.yaml"
    (tmp_path / "bad_cfg.yaml").write_text(yaml.safe_dump(doc))
    _one_line_error(["compare", str(tmp_path / "bad_cfg.yaml")], "entries[1].config", "missing_method.yaml")
    _one_line_error(["compare", str(suite), "--metrics", "psnr", "chamfer"], "--metrics", "chamfer", "psnr, ssim")
    _one_line_error(["compare", TOY], "not a suite file", "--configs")
    _one_line_error(["compare", str(suite), "--max_time", "5 minutes"], "max_time", "DD:HH:MM:SS")


def test_protocol_mismatch_is_refused_or_flagged(tmp_path):
    suite = _suite(tmp_path / "s.yaml")
    doc = yaml.safe_load(suite.read_text())
    doc.pop("evaluation")
    geo = ["--model.init_args.evaluation", "recon3d.metrics.EvaluationProtocol", "--model.init_args.evaluation.init_args.image_metrics"]
    doc["entries"][0]["overrides"] += [*geo, "[psnr]"]
    doc["entries"][1]["overrides"] += [*geo, "[psnr, ssim]"]
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc))
    _one_line_error(["compare", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "o")], "metric mismatch", "fast_lr", "image_metrics")
    doc = yaml.safe_load(suite.read_text())
    doc["entries"][1]["overrides"] += ["--data.num_test_objects", "3"]
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(doc))
    _one_line_error(["compare", str(tmp_path / "d.yaml"), "--out", str(tmp_path / "o")], "fast_lr", "data.num_test_objects", "3", "2")
    # accepted with data_differs: flagged, not refused (check only; no training)
    s = cmp.load_suite(tmp_path / "d.yaml")
    s.entries[1].data_differs = ("num_test_objects",)
    resolved = {e.name: cmp.resolve_config(cmp.config_args(e, s, tmp_path / "o")) for e in s.entries}
    assert cmp.check_same_protocol(resolved, s.entries) == {"fast_lr": {"num_test_objects": (3, 2)}}


def test_higher_is_better_matches_the_metric_classes():
    from recon3d.metrics import LPIPS, PSNR, SSIM, ChamferDistance, FScore, NormalConsistency, VolumeIoU
    from recon3d.metrics.pose import PoseError
    from recon3d.metrics.protocol import HIGHER_IS_BETTER, METRIC_NAMES

    assert set(HIGHER_IS_BETTER) == set(METRIC_NAMES)
    for names, cls in ((("psnr", "psnr_masked"), PSNR), (("ssim", "ssim_masked"), SSIM), (("lpips", "lpips_masked"), LPIPS),
                       (("cd",), ChamferDistance), (("fscore",), FScore), (("nc",), NormalConsistency), (("iou",), VolumeIoU),
                       (("rre", "te"), PoseError)):
        for n in names:
            assert HIGHER_IS_BETTER[n] is cls.higher_is_better, n


# ---------------------------------------------------------------------- the suite files
@pytest.mark.parametrize("path", SUITES, ids=[p.name for p in SUITES])
def test_suite_files_load(path):
    s = cmp.load_suite(path)
    assert len(s.entries) >= 2 and s.budget and all(e.config.is_file() for e in s.entries)
    assert isinstance(s.data, dict) and ("dataset" in s.data or "test_dataset" in s.data)


@pytest.mark.slow
def test_cpu_suite_entries_share_one_protocol(tmp_path):
    """Every entry of the CPU suite resolves and passes the same-data / same-protocol check."""
    s = cmp.load_suite(ROOT / "configs" / "compare" / "cpu.yaml")
    resolved = {e.name: cmp.resolve_config([*cmp.config_args(e, s, tmp_path), *cmp.budget_args(s.budget)]) for e in s.entries}
    flags = cmp.check_same_protocol(resolved, s.entries)
    assert set(flags) <= {e.name for e in s.entries if e.data_differs}
    tests = {yaml.safe_dump(r["data"]["init_args"]["dataset"]) for r in resolved.values()}
    assert len(tests) == 1


@pytest.mark.slow
def test_two_process_split(tmp_path):
    """torchrun with 2 CPU processes: entry i runs on rank i % 2, rank 0 reports both."""
    suite = _suite(tmp_path / "suite.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    from tests.reliability.harness import free_port

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    p = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "recon3d.cli", "compare", str(suite),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "running (toy.yaml, rank 0)" in p.stderr and "running (toy.yaml, rank 1)" in p.stderr
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert all(e["status"] == "done" and e["steps"] == STEPS for e in doc["entries"].values())


def test_budget_arguments():
    steps = cmp.budget_args({"max_steps": 7, "val_every": 2})
    assert steps[steps.index("--trainer.max_steps") + 1] == "7" and steps[steps.index("--trainer.max_time") + 1] == "null"
    assert steps[steps.index("--trainer.val_check_interval") + 1] == "2"
    # a wall-time budget alone keeps each config's max_steps (its LR schedule's length)
    timed = cmp.budget_args({"max_time": "00:00:02:00"})
    assert "--trainer.max_steps" not in timed and timed[timed.index("--trainer.max_time") + 1] == "00:00:02:00"
    assert timed[timed.index("--trainer.max_epochs") + 1] == "-1"
    assert cmp.budget_args({}) == []


@pytest.mark.slow
def test_sigkill_mid_entry_then_rerun(tmp_path):
    """A real kill: ``recon3d compare`` in its own process group gets SIGKILL while the second
    entry trains (its first checkpoint is on disk); the re-run leaves the finished entry's files
    untouched and resumes the killed one from its checkpoint."""
    import signal
    import time

    doc = yaml.safe_load(_suite(tmp_path / "suite.yaml").read_text())
    doc["budget"] = {"max_steps": 40, "val_every": 20, "checkpoint_every": 2}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "recon3d.cli", "compare", str(tmp_path / "suite.yaml"), "--out", str(out)]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    ckpt = out / "runs" / "fast_lr" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 540
    while time.time() < deadline and p.poll() is None and not ckpt.is_file():
        time.sleep(0.2)
    assert p.poll() is None, "compare ended before the kill: " + p.stderr.read().decode()[-2000:]
    assert ckpt.is_file() and (out / "runs" / "slow_lr" / "done.json").is_file()
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    before = _mtimes(out / "runs" / "slow_lr")
    killed_step = torch.load(ckpt, weights_only=True)["global_step"]
    assert killed_step < 40
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "slow_lr: finished earlier" in r.stderr
    assert _mtimes(out / "runs" / "slow_lr") == before
    done = json.loads((out / "runs" / "fast_lr" / "done.json").read_text())
    assert done["steps"] == 40 and 1 <= done["resumed_from_step"] <= 40
    assert json.loads((out / "results.json").read_text())["entries"]["fast_lr"]["status"] == "done"
