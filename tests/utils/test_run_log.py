"""``metrics.csv`` keeps its rows across a resume (:mod:`recon3d.utils.run_log`).

The reference is the file itself read with Python's ``csv`` module and hand-written rows; the
writer under test is driven through Lightning's own ``CSVLogger`` API.
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger

from recon3d.utils.run_log import KeepingCSVLogger, KeepingWriter, keep_history, row_signature

HEADER = ["epoch", "step", "train/loss", "val/psnr"]
EARLIER = [
    {"epoch": "0", "step": "0", "train/loss": "0.5", "val/psnr": ""},
    {"epoch": "0", "step": "1", "train/loss": "0.25", "val/psnr": ""},
    {"epoch": "0", "step": "1", "train/loss": "", "val/psnr": "12.5"},
    {"epoch": "1", "step": "2", "train/loss": "0.125", "val/psnr": ""},
]


def _write(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)


def _read(path):
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return r.fieldnames, [{k: v for k, v in row.items() if v != ""} for row in r]


def _nonempty(rows):
    return [{k: v for k, v in r.items() if v != ""} for r in rows]


def test_earlier_rows_are_kept_byte_for_byte_until_new_ones_come(tmp_path):
    path = tmp_path / "run" / "metrics.csv"
    _write(path, HEADER, EARLIER)
    before = path.read_bytes()
    w = KeepingWriter(str(tmp_path / "run"))  # Lightning's writer deletes the file here
    assert path.read_bytes() == before
    w.log_metrics({"train/loss": 0.0625, "epoch": 1}, step=3)
    w.save()
    header, rows = _read(path)
    assert header == HEADER
    assert rows == _nonempty(EARLIER) + [{"epoch": "1", "step": "3", "train/loss": "0.0625"}]
    assert path.read_bytes().startswith(before)  # appended: the earlier bytes are untouched


def test_a_row_logged_again_replaces_the_earlier_one(tmp_path):
    path = tmp_path / "run" / "metrics.csv"
    _write(path, HEADER, EARLIER)
    w = KeepingWriter(str(tmp_path / "run"))
    # a resume from step 2's checkpoint logs step 2's train row again, then a new column
    w.log_metrics({"train/loss": 0.1, "epoch": 1}, step=2)
    w.log_metrics({"val/ssim": 0.75, "epoch": 1}, step=2)
    w.save()
    header, rows = _read(path)
    assert header == sorted(HEADER + ["val/ssim"])
    assert rows == _nonempty(EARLIER[:3]) + [{"epoch": "1", "step": "2", "train/loss": "0.1"},
                                             {"epoch": "1", "step": "2", "val/ssim": "0.75"}]
    # the validation row at step 1 has other columns than the train row at step 1: both kept
    assert row_signature(EARLIER[1]) != row_signature(EARLIER[2])


def test_keep_history_through_the_logger_api(tmp_path):
    _write(tmp_path / "run" / "metrics.csv", HEADER, EARLIER)
    plain = CSVLogger(str(tmp_path), name="", version="plain")
    lg = keep_history(CSVLogger(str(tmp_path), name="", version="run"))
    assert type(lg) is KeepingCSVLogger and type(keep_history(plain)) is KeepingCSVLogger
    lg.log_metrics({"train/loss": 1.0, "epoch": 1}, step=3)
    lg.save()
    assert _read(tmp_path / "run" / "metrics.csv")[1] == _nonempty(EARLIER) + [{"epoch": "1", "step": "3", "train/loss": "1.0"}]

    class Mine(CSVLogger):
        pass

    assert type(keep_history(Mine(str(tmp_path)))) is Mine  # a user's own logger class is left alone


def test_lightnings_own_writer_would_lose_them(tmp_path):
    """The premise (negative control): Lightning's CSVLogger deletes the earlier rows."""
    _write(tmp_path / "run" / "metrics.csv", HEADER, EARLIER)
    lg = CSVLogger(str(tmp_path), name="", version="run")
    lg.log_metrics({"train/loss": 1.0, "epoch": 1}, step=3)
    lg.save()
    assert len(_read(tmp_path / "run" / "metrics.csv")[1]) == 1
