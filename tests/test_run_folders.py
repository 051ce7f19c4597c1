"""A run has one folder: ``--ckpt_path last`` resumes *this* run, or says there is none (issue 13).

Through the real CLI (``recon3d.cli.main``, in-process) on the toy config. References: the
folder layout Lightning's own ``ModelCheckpoint``/``CSVLogger`` rules give, the checkpoint's
``global_step`` read with ``torch.load``, and an uninterrupted run's ``metrics.csv``.
"""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path

import pytest
import torch

from recon3d.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs" / "toy.yaml")
GTR_CPU = str(ROOT / "configs" / "gtr_cpu.yaml")


def _run(*argv: str) -> tuple[int, list[str], str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    text = err.getvalue()
    return rc, [ln for ln in text.splitlines() if ln.startswith("recon3d: error:")], out.getvalue() + text


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _toy(cache: str, *extra: str) -> list[str]:
    return ["fit", "-c", TOY, "--data.dataset.init_args.cache_dir", cache, "--trainer.max_epochs", "1", *extra]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if v} for r in csv.DictReader(f)]


def _curve(rows: list[dict[str, str]]) -> dict[int, str]:
    return {int(r["step"]): r["train/loss"] for r in rows if "train/loss" in r}


def _step(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


def test_default_run_folder_is_stable_per_config_and_name(capsys):
    """gtr_cpu.yaml names no version: the run folder is <save_dir>/<name>/gtr_cpu, not a new version_N."""
    import yaml

    with pytest.raises(SystemExit):
        main(["fit", "-c", GTR_CPU, "--print_config"])
    logger = yaml.safe_load(capsys.readouterr().out)["trainer"]["logger"]["init_args"]
    assert logger["version"] is None  # the config leaves it open; the CLI fixes it when it runs
    from recon3d.cli import _lightning_cli_class

    cls = _lightning_cli_class()
    cls._run_subcommand = lambda self, name: None
    cli = cls(args=["fit", "-c", GTR_CPU, "--trainer.max_steps", "1"])
    assert Path(cli.trainer.log_dir) == Path("outputs/gtr_cpu/nerf/gtr_cpu")


def test_last_without_a_checkpoint_is_one_line_and_creates_nothing(cache, tmp_path):
    rc, err, text = _run(*_toy(cache, "--trainer.logger.init_args.save_dir", str(tmp_path / "out"), "--ckpt_path", "last"))
    assert rc == 2 and len(err) == 1 and "Traceback" not in text, text[-2000:]
    assert "--ckpt_path last" in err[0] and str(tmp_path / "out" / "run" / "checkpoints" / "last.ckpt") in err[0]
    assert "--fresh_if_missing" in err[0]
    assert not (tmp_path / "out").exists()


def test_fresh_if_missing_then_last_resumes_this_run_and_keeps_the_rows(cache, tmp_path):
    ref = tmp_path / "ref"
    rc, _, text = _run(*_toy(cache, "--run_dir", str(ref), "--trainer.max_steps", "2"))
    assert rc == 0, text[-2000:]
    run = tmp_path / "runs" / "mine"
    rc, _, text = _run(*_toy(cache, "--run_dir", str(run), "--trainer.max_steps", "1", "--ckpt_path", "last",
                             "--fresh_if_missing", "true"))
    assert rc == 0 and "starting this run from step 0" in text, text[-2000:]
    assert _step(run / "checkpoints" / "last.ckpt") == 1
    # a fresh fit into the same folder would overwrite it: refused
    rc, err, _ = _run(*_toy(cache, "--run_dir", str(run), "--trainer.max_steps", "2"))
    assert rc == 2 and len(err) == 1 and "already holds a run" in err[0] and "--ckpt_path last" in err[0]
    assert _step(run / "checkpoints" / "last.ckpt") == 1
    first = _rows(run / "metrics.csv")
    rc, _, text = _run(*_toy(cache, "--run_dir", str(run), "--trainer.max_steps", "2", "--ckpt_path", "last"))
    assert rc == 0 and "--ckpt_path last: " in text, text[-2000:]
    assert _step(run / "checkpoints" / "last.ckpt") == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # not last-v1.ckpt
    # the rows written before the resume are still there, and the loss curve is the uninterrupted run's
    final = _rows(run / "metrics.csv")
    assert first and all(r in final for r in first)
    assert _curve(final) == _curve(_rows(ref / "metrics.csv")) and sorted(_curve(final)) == [0, 1]


def test_last_names_the_other_runs_beside_it(cache, tmp_path):
    rc, _, text = _run(*_toy(cache, "--run_dir", str(tmp_path / "a"), "--trainer.max_steps", "1"))
    assert rc == 0, text[-2000:]
    rc, err, _ = _run(*_toy(cache, "--run_dir", str(tmp_path / "b"), "--ckpt_path", "last"))
    assert rc == 2 and len(err) == 1 and err[0].endswith("runs beside it with a last.ckpt: a")
