"""The non-finite guard, through the real CLI (in-process ``recon3d.cli.main``): a planted NaN
loss or NaN gradient skips the step with a counter and a message naming the step, the batch's
object ids and the non-finite terms; K in a row (or ``policy: halt``) stops the run with one
line and exit status 2."""

from __future__ import annotations

import csv
import logging
import re

import pytest

from recon3d.cli import main
from tests.reliability.harness import CONFIGS, ckpt_dir, cli_args, load_ckpt

TOY = CONFIGS[0]


def _fit(tmp_path, cache, *extra):
    return main(cli_args(TOY, tmp_path, cache, "--trainer.max_epochs", "1", *extra))


def _metric(tmp_path, key):
    with open(tmp_path / "run" / "metrics.csv") as f:
        vals = [float(r[key]) for r in csv.DictReader(f) if r.get(key)]
    return vals[-1]


def test_nan_loss_is_skipped_counted_and_named(tmp_path, synthetic_cache, caplog):
    caplog.set_level(logging.WARNING, logger="recon3d")
    assert _fit(tmp_path, synthetic_cache, "--model.init_args.nan_steps", "[1]") == 0
    msgs = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(msgs) == 1, msgs
    m = msgs[0]
    assert "global step 1" in m and "loss terms ['rgb', 'loss']" in m and "step skipped (1 so far)" in m
    ids = re.search(r"objects \[(.*?)\]", m).group(1)
    assert ids.count("synth_") == 2  # the two object ids of the batch
    assert _metric(tmp_path, "train/nonfinite_steps") == 1.0
    # The skipped batch made no optimizer step: 3 batches, 2 steps counted by the optimizer.
    ck = load_ckpt(ckpt_dir(tmp_path) / "last.ckpt")
    assert all(int(s["step"]) == 2 for s in ck["optimizer_states"][0]["state"].values())


def test_nan_gradient_is_skipped_counted_and_named(tmp_path, synthetic_cache, caplog):
    caplog.set_level(logging.WARNING, logger="recon3d")
    assert _fit(tmp_path, synthetic_cache, "--model.init_args.nan_grad_steps", "[2]") == 0
    msgs = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(msgs) == 1 and "non-finite gradients of" in msgs[0] and "global step 2" in msgs[0] and "synth_" in msgs[0], msgs
    assert _metric(tmp_path, "train/nonfinite_steps") == 1.0
    ck = load_ckpt(ckpt_dir(tmp_path) / "last.ckpt")
    for k, v in ck["state_dict"].items():
        assert v.isfinite().all(), k


def test_k_nonfinite_steps_in_a_row_halt(tmp_path, synthetic_cache, capsys):
    rc = _fit(tmp_path, synthetic_cache, "--model.init_args.nan_steps", "[0, 1, 2]",
              "--model.init_args.nonfinite.max_consecutive", "2")
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "recon3d" in ln]
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("recon3d: error: non-finite loss terms") and "global step 1" in err[0] \
        and "2 consecutive steps, halting" in err[0], err


@pytest.mark.parametrize("policy", ["halt"])
def test_halt_policy_stops_at_the_first(tmp_path, synthetic_cache, capsys, policy):
    rc = _fit(tmp_path, synthetic_cache, "--model.init_args.nan_grad_steps", "[1]", "--model.init_args.nonfinite.policy", policy)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    line = [ln for ln in err.splitlines() if ln.startswith("recon3d: error:")]
    assert len(line) == 1 and "gradients" in line[0] and "global step 1" in line[0], err
