"""Training / evaluation / export progress that reads well in a terminal and in a log file.

:class:`Recon3DProgressBar` is Lightning's tqdm bar (loss, PSNR and an ETA) when the output is a
terminal. When it is not (a SLURM log, CI, ``| tee``), a carriage-return bar would write one
unreadable line of thousands of updates, so it prints instead one plain line every
``log_every_n_steps`` optimizer steps::

    recon3d: step 500/1500 (33%)  loss 0.0123  psnr 21.4  0.21 s/step  elapsed 1m45s  ETA 3m30s

and, at the end of ``fit``, where the checkpoint and the logs are. The recon3d CLI adds it to
every Lightning run whose config names no other progress bar (``trainer.enable_progress_bar:
false`` turns all of it off).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar

__all__ = ["Recon3DProgressBar", "format_duration"]


def format_duration(seconds: float) -> str:
    """``75`` → ``"1m15s"``, ``3725`` → ``"1h02m"``, ``9.5`` → ``"9.5s"``."""
    if seconds != seconds or seconds < 0:  # NaN or negative: unknown
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Recon3DProgressBar(TQDMProgressBar):
    """tqdm bars in a terminal, one line per ``log_every_n_steps`` steps otherwise.

    Args:
        refresh_rate: tqdm refresh rate (batches) in a terminal.
        log_every_n_steps: steps between plain lines when the output is not a terminal.
        keys: logged metrics shown on each line, when present (the loss first).
        terminal: force the terminal (``True``) or plain-line (``False``) mode; ``None`` asks
            whether stderr is a terminal.
        stream: where the plain lines go (default: stderr).
    """

    def __init__(self, refresh_rate: int = 1, log_every_n_steps: int = 50, keys: tuple[str, ...] = ("loss", "psnr"),
                 terminal: bool | None = None, stream: Any = None):
        super().__init__(refresh_rate=refresh_rate, leave=False)
        if log_every_n_steps < 1:
            from recon3d.errors import ConfigError

            raise ConfigError(f"Recon3DProgressBar.log_every_n_steps: expected >= 1, got {log_every_n_steps}")
        self.log_every_n_steps = int(log_every_n_steps)
        self.keys = tuple(keys)
        self._stream = stream
        self.terminal = _is_terminal(sys.stderr) if terminal is None else bool(terminal)
        self._plain = not self.terminal
        if self._plain:
            self.disable()  # the tqdm bars are built disabled; the lines below replace them
        self._t0: float | None = None
        self._step0 = 0
        self._last_line_step = -1

    # ------------------------------------------------------------------ plain lines
    @property
    def stream(self):
        return self._stream if self._stream is not None else sys.stderr

    def _print(self, text: str) -> None:
        print(f"recon3d: {text}", file=self.stream, flush=True)

    def _metric_text(self, trainer) -> str:
        parts = []
        metrics = {**trainer.callback_metrics, **trainer.progress_bar_metrics}
        for k in self.keys:
            for name in (k, f"train/{k}", f"{k}_step", f"train/{k}_step"):
                if name in metrics:
                    v = metrics[name]
                    parts.append(f"{k} {float(v):.4g}")
                    break
        return "  ".join(parts)

    def _step_line(self, trainer) -> str:
        step = int(trainer.global_step)
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if total is None:
            est = trainer.estimated_stepping_batches
            total = int(est) if est not in (None, float("inf")) else None
        elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
        done = max(step - self._step0, 0)
        per = elapsed / done if done else float("nan")
        head = f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"
        eta = format_duration(per * (total - step)) if total and done else "?"
        tail = f"{per:.2f} s/step  elapsed {format_duration(elapsed)}  ETA {eta}" if done else f"elapsed {format_duration(elapsed)}"
        metrics = self._metric_text(trainer)
        return "  ".join(x for x in (head, metrics, tail) if x)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._t0 = time.perf_counter()
        self._step0 = int(trainer.global_step)
        if self._plain and trainer.is_global_zero:
            what = f"resuming at step {self._step0}" if self._step0 else "training"
            self._print(f"{what}: {type(pl_module).__name__}, a line every {self.log_every_n_steps} steps")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = int(trainer.global_step)
        if self._plain and trainer.is_global_zero and step != self._last_line_step and step % self.log_every_n_steps == 0 and step > 0:
            self._last_line_step = step
            self._print(self._step_line(trainer))

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(trainer.checkpoint_callback, "best_model_path", "")
        logs = trainer.logger.log_dir if trainer.logger is not None else None
        text = f"training finished at step {trainer.global_step} in {format_duration(elapsed)}"
        if ckpt:
            text += f"; checkpoint {ckpt}"
        if logs:
            text += f"; logs {logs}"
        if self._plain:
            self._print(text)
        else:
            print(f"recon3d: {text}", file=sys.stderr, flush=True)

    def _phase_line(self, trainer, what: str, n: int) -> None:
        if self._plain and trainer.is_global_zero and not trainer.sanity_checking:
            self._print(f"{what}: {n} batch{'es' if n != 1 else ''} done")

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        self._phase_line(trainer, "validation", int(sum(trainer.num_val_batches)) if trainer.num_val_batches else 0)

    def on_test_end(self, trainer, pl_module) -> None:
        super().on_test_end(trainer, pl_module)
        self._phase_line(trainer, "test", int(sum(trainer.num_test_batches)) if trainer.num_test_batches else 0)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self._plain and trainer.is_global_zero:
            total = sum(trainer.num_predict_batches) if trainer.num_predict_batches else None
            elapsed = time.perf_counter() - (self._p0 if getattr(self, "_p0", None) else time.perf_counter())
            per = elapsed / (batch_idx + 1)
            eta = f"  ETA {format_duration(per * (total - batch_idx - 1))}" if total else ""
            self._print(f"export: batch {batch_idx + 1}/{total or '?'}  {format_duration(elapsed)}{eta}")

    def on_predict_start(self, trainer, pl_module) -> None:
        super().on_predict_start(trainer, pl_module)
        self._p0 = time.perf_counter()
