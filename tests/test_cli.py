"""The ``recon3d`` entry point (issue 13): help without Lightning, one line per mistake, quiet output.

References are independent of recon3d's code paths: ``sys.modules`` of a fresh interpreter for
what the help imports, Python's ``float()`` for a negative value, ``errno``/``os.strerror`` for the
OS errors, and a plain Lightning ``Trainer`` run's own output for the silenced noise.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from recon3d import cli
from recon3d.cli import COMMAND_HELP, EXTRA_COMMANDS, LIGHTNING_COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs" / "toy.yaml")
ALL_COMMANDS = ["fit", "validate", "test", "predict", "demo", "data", "export", "bench", "compare"]


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_top_help_lists_every_subcommand_with_one_line():
    rc, out, _ = _run(["--help"])
    assert rc == 0
    assert set(ALL_COMMANDS) == set(LIGHTNING_COMMANDS) | set(EXTRA_COMMANDS) == set(COMMAND_HELP)
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ") and ln.split()}
    for name in ALL_COMMANDS:
        assert name in lines and len(lines[name].split()) > 3, (name, out)


@pytest.mark.parametrize("argv", [["--help"], ["fit", "--help"], ["test", "-h"], ["export", "--help"], ["demo", "--help"],
                                  ["data", "--help"], ["compare", "--help"]], ids=" ".join)
def test_help_imports_neither_lightning_nor_torch(argv):
    code = (f"import sys\nfrom recon3d.cli import main\ntry:\n    rc = main({argv!r})\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('\\nIMPORTED', rc, 'lightning' in sys.modules, 'torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    last = p.stdout.strip().splitlines()[-1]
    assert last == "IMPORTED 0 False False", p.stdout[-2000:] + p.stderr[-2000:]


def test_help_all_is_lightnings_full_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help-all"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--trainer.max_steps" in out and "--model" in out and "--run_dir" in out and "--fresh_if_missing" in out


def test_no_command_and_unknown_command_are_one_line():
    for argv, want in (([], "give a command"), (["fitt"], "did you mean 'fit'")):
        rc, out, err = _run(argv)
        assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and want in err, (argv, err)


@pytest.mark.parametrize("text", ["-1e-3", "-2.5E+2", "-0.5", "-7", "-.25"])
def test_negative_number_is_the_options_value(text, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "-c", TOY, "--model.init_args.lr", text, "--print_config"])
    assert exit_.value.code in (0, None), capsys.readouterr().err
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["lr"] == float(text)


def test_join_negative_numbers_leaves_everything_else():
    argv = ["fit", "-c", "a.yaml", "--x", "-1e-3", "--y=-2", "--flag", "--z", "-c", "--cb+=A", "-5"]
    assert cli.join_negative_numbers(argv) == ["fit", "-c", "a.yaml", "--x=-1e-3", "--y=-2", "--flag", "--z", "-c",
                                               "--cb+=A", "-5"]


# ---------------------------------------------------------------------- error mapping
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT])
def test_os_errors_are_one_line_naming_the_file(code):
    e = OSError(code, os.strerror(code), "/data/run/metrics.csv")
    try:  # as Lightning re-raises it: the OSError is the cause of another exception
        raise RuntimeError("while saving") from e
    except RuntimeError as wrapped:
        assert cli.error_line(wrapped) == cli.error_line(e)
    line = cli.error_line(e)
    assert line is not None and "/data/run/metrics.csv" in line and "\n" not in line
    reason = {errno.ENOSPC: "no space", errno.EROFS: "read-only", errno.EACCES: "permission denied", errno.EDQUOT: "quota"}[code]
    assert reason in line


def test_innermost_recon3d_error_wins_and_bugs_stay_bugs():
    from recon3d.errors import ConfigError

    try:
        try:
            raise ConfigError("model.n_samples: expected an integer >= 1, got 0")
        except ConfigError as inner:
            raise ValueError("Does not validate against any of the Union subtypes\nSubtypes: [...]") from inner
    except ValueError as outer:
        assert cli.error_line(outer) == "model.n_samples: expected an integer >= 1, got 0"
    assert cli.error_line(KeyError("a bug")) is None
    assert cli.error_line(OSError(errno.ENOENT, "No such file or directory", "x")) is None


def test_misconfiguration_is_one_trainer_line():
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    line = cli.error_line(MisconfigurationException("`max_steps` must be a non-negative integer or -1. You passed in -5."))
    assert line.startswith("trainer: `max_steps`") and "-5" in line


# ---------------------------------------------------------------------- quiet by default
def test_output_policy_filters_the_listed_noise():
    import logging

    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    h = Grab()
    log.addHandler(h)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        for verbose in (False, True):
            records.clear()
            with warnings.catch_warnings(record=True) as got:
                warnings.simplefilter("always")
                with cli.output_policy(verbose):
                    warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`",
                                  FutureWarning, stacklevel=1)
                    warnings.warn("Found 3 module(s) in eval mode at the start of training.", UserWarning, stacklevel=1)
                    warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
                    log.info("💡 Tip: For seamless cloud logging ..., try installing [litlogger](https://...)")
                    log.info("GPU available: False, used: False")
            msgs = [str(w.message) for w in got]
            if verbose:
                assert len(msgs) == 3 and len(records) == 2
            else:
                assert msgs == ["an unrelated warning"] and records == ["GPU available: False, used: False"]
    finally:
        log.removeHandler(h)
        log.setLevel(old_level)


def test_output_policy_switches_off_hub_progress_bars(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    hub.utils.enable_progress_bars()
    with cli.output_policy(False):
        assert hub.utils.are_progress_bars_disabled() and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert not hub.utils.are_progress_bars_disabled() and "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    with cli.output_policy(True):
        assert not hub.utils.are_progress_bars_disabled()


@pytest.mark.slow  # two fresh interpreters + a fit: ~30 s on 2 cores
def test_a_training_run_is_quiet_unless_verbose(tmp_path):
    """End to end, as a user runs it: the tips and the LeafSpec warning are gone, --verbose shows them."""
    base = [str(Path(sys.executable).parent / "recon3d"), "fit", "-c", TOY, "--data.dataset.init_args.cache_dir",
            str(tmp_path / "cache"), "--trainer.max_steps", "1", "--trainer.max_epochs", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "HF_HUB_DISABLE_PROGRESS_BARS")}
    env["OMP_NUM_THREADS"] = "1"
    texts = {}
    for verbose in (False, True):
        run_dir = tmp_path / ("verbose" if verbose else "quiet")
        p = subprocess.run(base + ["--run_dir", str(run_dir)] + (["--verbose"] if verbose else []), capture_output=True,
                           text=True, timeout=300, env=env, cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        texts[verbose] = p.stdout + p.stderr
    assert "💡 Tip" in texts[True] and "LeafSpec" in texts[True]  # the reference: what Lightning prints
    assert "💡 Tip" not in texts[False] and "LeafSpec" not in texts[False] and "in eval mode" not in texts[False]


def test_extra_commands_usage_errors_are_one_line():
    rc, out, err = _run(["export"])
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("recon3d: error: recon3d export: the following arguments are required: -c/--config, --ckpt")
    rc, _, err = _run(["data", "synthetic"])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--out" in err


def test_default_version_is_the_config_names():
    assert cli.default_version(["configs/m3d.yaml", Path("configs/m3d/exp1.yaml")]) == "m3d+exp1"
    assert cli.default_version([]) == "run"
    assert json.dumps(cli.default_version(["a b/c d.yaml"])) == '"c_d"'
