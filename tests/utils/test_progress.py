"""Progress reporting: plain lines with step, loss and ETA when the output is not a terminal."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from recon3d.utils.progress import Recon3DProgressBar, format_duration

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("sec,text", [(9.46, "9.5s"), (75, "1m15s"), (3725, "1h02m"), (float("nan"), "?")])
def test_format_duration(sec, text):
    assert format_duration(sec) == text


def test_plain_lines_every_n_steps_with_eta_and_final_paths(tmp_path):
    from recon3d.cli import run_lightning_cli

    stream = io.StringIO()
    cli = run_lightning_cli(
        ["-c", str(REPO / "configs/toy.yaml"), "--data.dataset.init_args.cache_dir", str(tmp_path / "cache"),
         "--trainer.logger.init_args.save_dir", str(tmp_path / "out"), "--trainer.max_epochs", "3",
         "--trainer.max_steps", "4", "--trainer.enable_progress_bar", "true"],
        run=False,
    )
    bars = [c for c in cli.trainer.callbacks if isinstance(c, Recon3DProgressBar)]
    assert len(bars) == 1  # added by the CLI, the only progress bar
    bar = bars[0]
    assert bar._plain  # pytest's stderr is not a terminal
    bar._stream, bar.log_every_n_steps = stream, 2
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    lines = stream.getvalue().splitlines()
    steps = [ln for ln in lines if re.match(r"recon3d: step \d+/4 \(\d+%\)", ln)]
    assert [s.split()[2] for s in steps] == ["2/4", "4/4"], lines
    assert "loss " in steps[0] and "ETA " in steps[0] and "s/step" in steps[0]
    end = [ln for ln in lines if "training finished at step 4" in ln]
    assert end and "last.ckpt" in end[0] and str(tmp_path / "out") in end[0]


def test_disabled_progress_adds_no_bar(tmp_path):
    from recon3d.cli import run_lightning_cli

    cli = run_lightning_cli(["-c", str(REPO / "configs/toy.yaml"), "--data.dataset.init_args.cache_dir", str(tmp_path / "c"),
                             "--trainer.logger.init_args.save_dir", str(tmp_path / "o")], run=False)
    assert not any(isinstance(c, Recon3DProgressBar) for c in cli.trainer.callbacks)


def test_bad_interval_is_refused():
    from recon3d.errors import ConfigError

    with pytest.raises(ConfigError, match="log_every_n_steps"):
        Recon3DProgressBar(log_every_n_steps=0)
