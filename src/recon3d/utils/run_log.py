"""A run's ``metrics.csv`` keeps its history across resumes and later evaluations.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` whenever it opens a log folder that already
has one ("Previous log files in this directory will be deleted when the new ones are saved!"), so
``recon3d fit --ckpt_path last`` lost every row logged before the resume, and a ``recon3d test``
in the run's folder wiped the training curve. The recon3d CLI makes every plain ``CSVLogger`` of a
run a :class:`KeepingCSVLogger` (:func:`keep_history`) and adds :class:`MetricsHistory`; the
logger's writer is then a :class:`KeepingWriter`, which

- keeps the rows already in the file and appends the new ones (the header grows when new
  columns appear, as Lightning's own writer does);
- drops an earlier row when this session logs a row with the same step and the same columns
  (a resumed run logs again every step after its checkpoint: those rows replace the ones the
  interrupted run wrote; the rows before the checkpoint stay, byte for byte);
- is flushed to disk right after each checkpoint is written (at the next batch or validation
  start), so the rows a checkpoint covers are on disk before a crash can take them: Lightning
  itself flushes only every ``flush_logs_every_n_steps`` (100) steps, and a kill in between lost
  rows that the resumed run never logs again.

A resumed run therefore ends with the same ``metrics.csv`` rows as an uninterrupted one
(``tests/reliability/test_resume.py`` compares them).
"""

from __future__ import annotations

import csv
import io
from typing import Any

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from recon3d.utils.io import atomic_write_text

__all__ = ["KeepingCSVLogger", "KeepingWriter", "MetricsHistory", "keep_history", "row_signature"]


def row_signature(row: dict[str, Any]) -> tuple[int, frozenset[str]]:
    """``(step, the columns that hold a value)``: two rows with the same signature are the same
    log entry written twice (e.g. before and after a resume)."""
    keys = frozenset(k for k, v in row.items() if v is not None and v != "")
    try:
        step = int(float(row.get("step", -1)))
    except (TypeError, ValueError):
        step = -1
    return step, keys


class KeepingWriter(ExperimentWriter):
    """Lightning's CSV experiment writer that keeps the file's earlier rows (module docstring).

    Args:
        log_dir: the run's log folder (``metrics.csv`` and ``hparams.yaml`` live there).
    """

    def __init__(self, log_dir: str):
        self._earlier: list[dict[str, str]] = []
        self._earlier_keys: list[str] = []
        self._session: list[dict[str, Any]] = []
        super().__init__(log_dir)
        self.metrics_keys = list(self._earlier_keys)

    def _check_log_dir_exists(self) -> None:
        # Lightning deletes metrics.csv here; read it instead.
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            self._earlier_keys = list(reader.fieldnames or [])
            self._earlier = [{k: v for k, v in row.items() if k is not None and v not in ("", None)} for row in reader]

    def save(self) -> None:
        try:
            self._save()
        except OSError as e:
            if e.filename:
                raise
            # a write() on a full disk names no file; the one-line error should
            raise OSError(e.errno, e.strerror, self.metrics_file_path) from e

    def _save(self) -> None:
        if not self.metrics:
            return
        pending = self.metrics
        self._session.extend(pending)
        new = {row_signature(r) for r in pending}
        if any(row_signature(r) in new for r in self._earlier):
            # Rows this session logs again replace the earlier ones: rewrite the whole file.
            self._earlier = [r for r in self._earlier if row_signature(r) not in new]
            self._record_new_keys()
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(self._earlier)
            writer.writerows(self._session)
            atomic_write_text(self.metrics_file_path, buf.getvalue())
            self.metrics = []
            return
        super().save()


class KeepingCSVLogger(CSVLogger):
    """``CSVLogger`` whose writer is a :class:`KeepingWriter` (same arguments as ``CSVLogger``)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> KeepingWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = KeepingWriter(log_dir=self.log_dir)
        return self._experiment


def keep_history(logger: object) -> object:
    """Make a plain Lightning ``CSVLogger`` a :class:`KeepingCSVLogger` in place (before its
    writer exists; Lightning creates it when the run sets up). Other loggers are left alone."""
    if type(logger) is CSVLogger and getattr(logger, "_experiment", None) is None:
        logger.__class__ = KeepingCSVLogger
    return logger


class MetricsHistory(L.Callback):
    """Flushes the loggers to disk after each checkpoint (module docstring)."""

    def __init__(self) -> None:
        self._flush = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._flush = True

    def _maybe_flush(self, trainer: L.Trainer) -> None:
        if self._flush:
            self._flush = False
            for logger in trainer.loggers:
                logger.save()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._maybe_flush(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._maybe_flush(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._maybe_flush(trainer)
