"""Deterministic resume: SIGKILL a CPU training run at several points, resume with
``--ckpt_path last``, and end bit-identical (every parameter and optimizer tensor ``torch.equal``)
to an uninterrupted run.

Kill points (3 optimizer steps per epoch, 2 epochs, a ``last.ckpt`` after every step;
:class:`~recon3d.methods.toy.FaultInjector` runs before ModelCheckpoint in a step, so a kill
"after step N" loses step N's checkpoint and resumes from N-1):

=====================  =========================================  ==========================
id                     where the process dies                     resumes from
=====================  =========================================  ==========================
``mid_epoch``          after step 5 (epoch 1, batch 2 of 3)        step 4, mid-epoch
``validation``         inside validation after epoch 0            step 3 (epoch end)
``checkpoint_write``   half-way through writing step 3's last.ckpt step 2 (the old file)
``epoch_end`` (slow)   in ``on_train_epoch_end`` of epoch 0        step 3
``first_step`` (slow)  after step 1, before any checkpoint exists  nothing: ``--ckpt_path last``
                                                                   refuses (one line), then
                                                                   ``--fresh_if_missing true``
                                                                   starts afresh
=====================  =========================================  ==========================

The resumed run's ``metrics.csv`` is the uninterrupted run's, row for row: the rows written
before the kill are kept (Lightning's CSVLogger would delete them) and flushed at every
checkpoint (:mod:`recon3d.utils.run_log`). The exceptions are ``validation`` and ``epoch_end``:
the killed validation or epoch-end hook never finished and Lightning does not run it again on
resume, so the rows that hook would have written are absent (nothing else).
"""

from __future__ import annotations

import csv
import io
import time

import pytest
import torch

from tests.reliability.harness import (
    CONFIGS,
    FULL_MATRIX_ENV,
    assert_bit_identical,
    ckpt_dir,
    cli_args,
    full_matrix,
    load_ckpt,
    run,
    tail,
)

pytestmark = pytest.mark.ddp

KILLS = {
    "mid_epoch": (["--trainer.callbacks+=recon3d.methods.toy.FaultInjector", "--trainer.callbacks.kill_after_step=5"], 4),
    "validation": (["--trainer.callbacks+=recon3d.methods.toy.FaultInjector", "--trainer.callbacks.kill_in_validation_epoch=0"], 3),
    "checkpoint_write": ("plugin", 2),
    "epoch_end": (["--trainer.callbacks+=recon3d.methods.toy.FaultInjector", "--trainer.callbacks.kill_at_epoch_end=0"], 3),
    "first_step": (["--trainer.callbacks+=recon3d.methods.toy.FaultInjector", "--trainer.callbacks.kill_after_step=1"], None),
}
SLOW = {"epoch_end", "first_step"}
#: Configs that run only the ``mid_epoch`` kill point in the default suite: the plug-in method, and
#: the LoRA-boosting wrappers (BoostModule over GTR / LGM), whose loop, checkpoint and optimiser
#: state are their base method's plus the adapters -- the bases run every kill point. Keeps the
#: default suite in its time budget; ``make test-ddp`` runs the same selection.
ONE_KILL_POINT = {"gaussian_fit", "mvboost", "mvboost_gtr"}
#: Configs that run every kill point in the default suite. The kill points test Lightning's loop
#: and recon3d's checkpoint / run-log machinery, which no method changes; every other config runs
#: the mid-epoch point there and the whole matrix under ``make test-ddp`` (``RECON3D_FULL_MATRIX=1``).
FULL_MATRIX = {"toy"}
#: Configs whose kill/resume run is in the full matrix only (``make test-ddp``): the boosting
#: wrappers and VGGT's LoRA stage (their loop, checkpoint and optimiser state are ReconModule's
#: plus adapters), ReconViaGen (TrellisModule's stage machinery, which ``trellis`` runs here) and
#: the plug-in. Every base method (toy, gtr, m3d, lgm, trellis) runs the mid-epoch point by default.
#: Default-suite time: each of these costs ~50 s (a reference run and a killed + resumed run).
FULL_MATRIX_ONLY = {"gaussian_fit", "mvboost", "mvboost_gtr", "vggt", "reconviagen"}
RESULTS: dict[str, str] = {}


def _rows(text: str) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if v} for r in csv.DictReader(io.StringIO(text))]


def _tensors(ckpt: dict) -> dict[str, torch.Tensor]:
    out = {f"param/{k}": v for k, v in ckpt["state_dict"].items()}
    for i, opt in enumerate(ckpt["optimizer_states"]):
        for pid, st in opt["state"].items():
            for name, v in st.items():
                if isinstance(v, torch.Tensor):
                    out[f"opt{i}/{pid}/{name}"] = v
    return out


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: c.name)
def reference(request, tmp_path_factory, synthetic_cache):
    case = request.param
    if case.name in FULL_MATRIX_ONLY and not full_matrix():
        pytest.skip(f"{case.name}: kill/resume with {FULL_MATRIX_ENV}=1 (make test-ddp); its base machinery resumes in the default suite")
    d = tmp_path_factory.mktemp(f"ref_{case.name}")
    # Its own lane: not a sibling fork of the killed and resumed runs (the same hash seed and layout).
    p = run(cli_args(case, d, synthetic_cache), cwd=d, lane="reference")
    assert p.returncode == 0, tail(p)
    ref = load_ckpt(ckpt_dir(d) / "last.ckpt")
    assert ref["global_step"] == case.steps_per_epoch * case.max_epochs
    return case, ref, (ckpt_dir(d).parent / "metrics.csv").read_text()


def _plugin_config(tmp_path, kill_on_write: int):
    f = tmp_path / "kill_during_write.yaml"
    f.write_text(
        "trainer:\n  plugins:\n    - class_path: recon3d.methods.toy.KillDuringWriteIO\n"
        f"      init_args:\n        kill_on_write: {kill_on_write}\n        target: last.ckpt\n"
    )
    return ["-c", str(f)]


@pytest.mark.parametrize(
    "point", [pytest.param(k, marks=pytest.mark.slow) if k in SLOW else k for k in KILLS]
)
def test_kill_and_resume_is_bit_identical(reference, point, tmp_path, synthetic_cache):
    case, ref, ref_metrics = reference
    if point != "mid_epoch" and case.name in ONE_KILL_POINT:
        pytest.skip(f"{case.name} gets the conformance rule's one mid-epoch kill point; every kill point runs for the base methods")
    if point != "mid_epoch" and case.name not in FULL_MATRIX and not full_matrix():
        pytest.skip(f"{case.name}: the mid-epoch kill point in the default suite; every kill point with {FULL_MATRIX_ENV}=1 (make test-ddp)")
    fault, resume_step = KILLS[point]
    fault_args = _plugin_config(tmp_path, 3) if fault == "plugin" else fault
    t = time.perf_counter()
    p = run(cli_args(case, tmp_path, synthetic_cache, *fault_args), cwd=tmp_path)
    assert p.returncode == -9, f"expected SIGKILL, got {p.returncode}:\n{tail(p)}"
    assert "[fault] SIGKILL" in p.stdout + p.stderr
    last = ckpt_dir(tmp_path) / "last.ckpt"
    if resume_step is None:
        assert not last.exists()
    else:
        ck = load_ckpt(last)  # never truncated: loads weights-only
        assert ck["global_step"] == resume_step
    ckpts = sorted(x.name for x in ckpt_dir(tmp_path).glob("*")) if ckpt_dir(tmp_path).exists() else []
    assert all(n == "last.ckpt" or (n.startswith(".last.ckpt.") and n.endswith(".tmp")) for n in ckpts), ckpts

    resume = ["--ckpt_path", "last"]
    if resume_step is None:  # nothing to resume: said in one line, and started afresh only when asked
        q = run(cli_args(case, tmp_path, synthetic_cache, *resume), cwd=tmp_path)
        err = [ln for ln in q.stderr.splitlines() if ln.startswith("recon3d: error:")]
        assert q.returncode == 2 and len(err) == 1 and "last.ckpt does not exist" in err[0], tail(q)
        resume += ["--fresh_if_missing", "true"]
    q = run(cli_args(case, tmp_path, synthetic_cache, *resume), cwd=tmp_path)
    assert q.returncode == 0, tail(q)
    if resume_step is not None:
        assert "Restored all states from the checkpoint" in q.stdout + q.stderr, tail(q)
    final = load_ckpt(last)
    assert final["global_step"] == ref["global_step"]
    assert_bit_identical(_tensors(final), _tensors(ref))
    if resume_step is not None:
        got, want = _rows((ckpt_dir(tmp_path).parent / "metrics.csv").read_text()), _rows(ref_metrics)
        assert [r for r in got if "train/loss" in r] == [r for r in want if "train/loss" in r], "loss rows differ"
        assert not [r for r in got if r not in want], "rows the uninterrupted run does not have"
        missing = [r for r in want if r not in got]
        if point in ("validation", "epoch_end"):
            # The killed validation / epoch-end hook never finished, and a resume (which starts the
            # next epoch) does not run it again: the rows that hook writes (validation metrics; the
            # epoch's non-finite-step and skipped-sample counts) are absent, nothing else is.
            assert all(int(r["step"]) == resume_step - 1 and "train/loss" not in r for r in missing), missing
        else:
            assert got == want, "metrics.csv rows differ"
    assert not list(ckpt_dir(tmp_path).glob(".*.tmp")), "stale temporary checkpoint left behind"
    # Run-control settings are not model hyper-parameters: nothing of the fault injection is saved.
    assert "kill" not in repr(final.get("hyper_parameters", {})) and "Fault" not in repr(final.get("hyper_parameters", {}))
    RESULTS[point] = f"killed (SIGKILL), resumed from step {resume_step}, bit-identical, {time.perf_counter() - t:.0f} s"
    print(f"\nresume results: {RESULTS}")


@pytest.mark.slow
def test_non_atomic_write_would_truncate(reference, tmp_path, synthetic_cache):
    """Negative control: the same kill with a plain (non-atomic) write leaves a truncated
    ``last.ckpt``; recon3d's loader then refuses it with one line instead of a traceback."""
    case = reference[0]
    f = tmp_path / "plain.yaml"
    f.write_text("trainer:\n  plugins:\n    - class_path: recon3d.methods.toy.KillDuringWriteIO\n"
                 "      init_args:\n        kill_on_write: 3\n        atomic: false\n")
    p = run(cli_args(case, tmp_path, synthetic_cache, "-c", str(f)), cwd=tmp_path)
    assert p.returncode == -9, tail(p)
    q = run(cli_args(case, tmp_path, synthetic_cache, "--ckpt_path", "last"), cwd=tmp_path)
    assert q.returncode == 2, tail(q)
    err = [ln for ln in q.stderr.splitlines() if ln.startswith("recon3d: error:")]
    assert len(err) == 1 and "last.ckpt" in err[0] and "Traceback" not in q.stderr, tail(q)
