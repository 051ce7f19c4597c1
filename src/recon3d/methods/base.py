"""``ReconModule``: what every recon3d method shares.

A method subclasses it and implements

- :meth:`training_losses` ``(batch) -> dict`` of named scalar terms with the total under ``"loss"``;
- :meth:`render_views` ``(batch, cameras) ->`` :class:`~recon3d.representations.RenderOutput` (or a
  dict with its keys) with ``"rgb" (B,V,3,H,W)`` (and optionally ``"alpha"``, ``"depth"``) for the
  given target cameras;
- optionally :meth:`predict_geometry` ``(batch) -> dict`` with ``"points" (B,P,3)`` (and
  ``"normals"``; optionally ``"valid" (B,)`` bool and ``"invalid_reason"`` str for objects that
  have no geometry to score) for geometry metrics, and :meth:`export_object` for ``predict``.

The base class then gives every method the same validation/test loop (one
:class:`~recon3d.metrics.EvaluationProtocol`, one set of metric names, PNG grids of inputs /
predictions / targets, per-object CSV), a non-finite guard (skip or halt on NaN/inf losses and
gradients, naming the step, the objects and the terms), reporting of skipped bad samples, and
weights-only initialisation from an earlier stage (``init_weights``, strict unless
``init_weights_ignore`` names the keys that may differ). Geometry metrics that cannot be computed
for an object (no surface yet, no ``predict_geometry``) are recorded with the reason, which the
protocol writes to ``metrics.json``.

Weights and hyper-parameters (:mod:`recon3d.utils.checkpoint`, :mod:`recon3d.utils.hparams`):

- a bare ``self.save_hyperparameters()`` is safe: a sub-model given as a config (``recon3d fit``)
  is saved as its ``class_path`` + ``init_args``; one built in Python (an ``nn.Module`` object)
  is omitted with the reason (``checkpoint["hyper_parameters_omitted"]``), never pickled, so the
  checkpoint always loads weights-only. No hand-kept ``ignore=[...]`` list is needed.
- loading a checkpoint's ``state_dict`` (resume, ``load_from_checkpoint``) is strict with the one
  key-mismatch report of :func:`~recon3d.utils.checkpoint.key_mismatch_report` on one line.
- frozen pretrained parts (:meth:`frozen_pretrained`; submodules marked with
  :func:`~recon3d.utils.checkpoint.load_frozen` by default) are left out of checkpoints and
  re-attached from their source file on load.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from recon3d.data.batch import Batch
from recon3d.data.cameras import Cameras
from recon3d.errors import CheckpointError, Recon3DError

__all__ = ["ReconModule", "NonFiniteGuard", "NonFiniteLossError"]

log = logging.getLogger(__name__)


class NonFiniteLossError(Recon3DError, RuntimeError):
    """Raised when the non-finite guard halts training."""


@dataclass
class NonFiniteGuard:
    """What to do when a loss term or a gradient is NaN/inf.

    Attributes:
        policy: ``"skip"`` the step (count it; halt after ``max_consecutive`` in a row) or
            ``"halt"`` at the first one.
        max_consecutive: consecutive skipped steps after which training halts.
    """

    policy: Literal["skip", "halt"] = "skip"
    max_consecutive: int = 10


#: the metrics :meth:`EvaluationProtocol.update_geometry` reports (named when they are missing)
GEOMETRY_METRICS = ("cd", "fscore", "precision", "recall", "nc")


def geometry_metric_names(batch: Batch, predicts_normals: bool) -> tuple[str, ...]:
    """The geometry metrics an object of ``batch`` can have: nc exists only where both the
    prediction and the ground truth have normals (a note on it otherwise would mislead)."""
    has_nc = predicts_normals and batch.geometry.surface_normals is not None
    return GEOMETRY_METRICS if has_nc else GEOMETRY_METRICS[:4]


class ReconModule(L.LightningModule):
    """Base LightningModule of recon3d methods (see module docstring).

    Args:
        evaluation: the evaluation protocol fed by validation/test (None: losses only).
        init_weights: weights-only initialisation from a checkpoint or safetensors file (the
            previous stage); unlike ``--ckpt_path`` it restores no optimizer, step or config.
            Strict: every key must match (one error line with the first missing / unexpected keys).
        init_weights_ignore: glob patterns (or ``"re:<regex>"``) of keys that may be missing
            from ``init_weights``, extra in it or of another shape (e.g. ``["lpips.*"]`` when the
            previous stage had no LPIPS loss); those keys keep their initial values.
        nonfinite: non-finite loss/gradient policy.
        vis_views: how many target views per object the PNG grids show.

    Run-time options: :attr:`RUNTIME_OPTIONS` names the init args that change how a trained model
    is evaluated, rendered or exported, not the model itself or how it trains. With a checkpoint
    (``--ckpt_path``, ``recon3d export --ckpt``) the command line's values of these win, while
    every other hyper-parameter comes from the checkpoint (:mod:`recon3d.cli`). A subclass
    extends the set: ``RUNTIME_OPTIONS = ReconModule.RUNTIME_OPTIONS | {"export_resolution"}``.
    """

    #: Init args the command line sets even when a checkpoint is given (class docstring).
    RUNTIME_OPTIONS: frozenset[str] = frozenset({"evaluation", "vis_views"})

    #: The representation type :meth:`export_object` writes (``recon3d export --format`` offers
    #: what :func:`recon3d.render.export.export_formats` says it supports); None: no export.
    EXPORT_REPRESENTATION: type | None = None
    #: Formats :meth:`export_object` writes; None: the method's default (``recon3d export --format``).
    export_formats: tuple[str, ...] | None = None

    def __init__(
        self,
        evaluation: Any = None,
        init_weights: str | None = None,
        nonfinite: NonFiniteGuard | None = None,
        vis_views: int = 4,
        init_weights_ignore: list[str] | None = None,
    ):
        super().__init__()
        self.evaluation = evaluation
        self.init_weights = init_weights
        from recon3d.utils.checkpoint import check_ignore_patterns

        self.init_weights_ignore = check_ignore_patterns(init_weights_ignore, "model.init_weights_ignore")
        if isinstance(nonfinite, dict):  # as saved in hyper-parameters (recon3d.utils.hparams: a dataclass's fields)
            nonfinite = NonFiniteGuard(**nonfinite)
        self.nonfinite = nonfinite or NonFiniteGuard()
        self.vis_views = vis_views
        self.nonfinite_steps = 0
        self._consecutive_nonfinite = 0
        self._skipped: list[tuple[str, str]] = []
        self._vis_done = False
        self._last_batch_ids: list[str] = []

    # ------------------------------------------------------------------ to implement
    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def render_views(self, batch: Batch, cameras: Cameras) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict_geometry(self, batch: Batch) -> dict[str, torch.Tensor] | None:
        return None

    def export_object(self, batch: Batch, index: int, out_dir: Path) -> dict[str, str]:
        """Write the reconstruction of object ``index`` of ``batch`` under ``out_dir``; return files."""
        return {}

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        if self.init_weights and stage == "fit" and not getattr(self, "_init_weights_loaded", False):
            from recon3d.utils.checkpoint import load_weights_into

            load_weights_into(self, self.init_weights, strict=True, ignore=self.init_weights_ignore)
            self._init_weights_loaded = True
            log.info("initialised weights from %s", self.init_weights)

    # ------------------------------------------------------------------ hyper-parameters and weights
    def save_hyperparameters(self, *args: Any, ignore: Any = None, frame: Any = None, logger: bool = True) -> None:
        """Lightning's ``save_hyperparameters`` whose result always loads weights-only.

        Same arguments as Lightning's. Afterwards every value is plain data
        (:func:`recon3d.utils.hparams.safe_hparams`): configs stay configs, an ``nn.Module`` or other
        object built in Python is left out and its reason kept in :attr:`hparams_omitted`
        (written to the checkpoint as ``"hyper_parameters_omitted"``). Module objects are left out
        before Lightning deep-copies the arguments, so a large sub-model is never copied.
        """
        from lightning.pytorch.core.mixins.hparams_mixin import HyperparametersMixin, _given_hyperparameters
        from lightning.pytorch.utilities.parsing import collect_init_args

        from recon3d.utils.hparams import OmittedValue, safe_hparams, safe_value

        if frame is None:
            frame = inspect.currentframe().f_back
        ignore = [ignore] if isinstance(ignore, str) else [i for i in (ignore or []) if isinstance(i, str)]
        omitted: dict[str, str] = {}
        if _given_hyperparameters.get() is None and not args:
            init: dict[str, Any] = {}
            for local in collect_init_args(frame, [], classes=(HyperparametersMixin,)):
                init.update(local)
            for name, value in init.items():
                if name not in ignore and isinstance(value, torch.nn.Module):
                    try:
                        safe_value(value, name)
                    except OmittedValue as why:
                        omitted[name] = str(why)
        with warnings.catch_warnings():
            # Lightning advises an ignore list for module arguments; they are handled here.
            warnings.filterwarnings("ignore", message=r".*is an instance of `nn.Module` and is already saved")
            super().save_hyperparameters(*args, ignore=ignore + sorted(omitted), frame=frame, logger=logger)
        kept, more = safe_hparams(self._hparams)
        omitted.update(more)
        self._hparams = type(self._hparams)(kept)
        self._hparams_initial = copy.deepcopy(self._hparams)
        self.hparams_omitted = {**getattr(self, "hparams_omitted", {}), **omitted}
        for name in kept:
            self.hparams_omitted.pop(name, None)
        if omitted:
            log.info("%s: hyper-parameters not saved (built in Python, no config to record): %s",
                     type(self).__name__, "; ".join(omitted.values()))

    def frozen_pretrained(self) -> dict[str, Any]:
        """``{submodule name: source}`` of the frozen pretrained parts that checkpoints leave out
        and re-attach from ``source`` (a :class:`~recon3d.utils.checkpoint.FrozenSource` or a file
        path whose keys are the submodule's own). Default: the submodules marked by
        :func:`~recon3d.utils.checkpoint.load_frozen` / ``mark_frozen``; a method may override it."""
        from recon3d.utils.checkpoint import frozen_parts_of

        return frozen_parts_of(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Make the hyper-parameters weights-only safe (also those set by other means than
        :meth:`save_hyperparameters`, and the datamodule's) and leave frozen parts out."""
        from recon3d.utils.checkpoint import strip_frozen_parts
        from recon3d.utils.hparams import safe_hparams

        omitted = dict(getattr(self, "hparams_omitted", {}))
        for key, mine in (("hyper_parameters", True), ("datamodule_hyper_parameters", False)):
            hp = checkpoint.get(key)
            if isinstance(hp, dict):
                kept, more = safe_hparams(hp)
                checkpoint[key] = kept
                omitted.update(more if mine else {f"datamodule.{k}": v for k, v in more.items()})
        if omitted:
            checkpoint["hyper_parameters_omitted"] = omitted
        strip_frozen_parts(checkpoint, self.frozen_pretrained())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Re-attach the frozen parts a checkpoint left out, from their source files."""
        from recon3d.utils.checkpoint import attach_frozen_parts

        attach_frozen_parts(checkpoint, where=self._checkpoint_name(), module=self)

    def _checkpoint_name(self) -> str:
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        return str(path) if path else "checkpoint"

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` whose mismatch is one :class:`CheckpointError` line (the
        report of :func:`~recon3d.utils.checkpoint.key_mismatch_report`), not torch's multi-line
        RuntimeError. Tied weights count as present when any of their names is."""
        from recon3d.utils.checkpoint import compare_state_dicts, tied_keys

        own = self.state_dict()
        if own:  # a model built lazily (configure_model) has nothing to compare yet
            mm = compare_state_dicts(own, state_dict, strict=strict, aliases=tied_keys(self))
            if mm:
                raise CheckpointError(f"{self._checkpoint_name()}: weights do not match {type(self).__name__}: {mm.line()}")
            strict = False  # checked above, with tied weights understood
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------ learning-rate schedule
    def lr_factor(self, step: int) -> float:
        """Multiplier of every param group's initial learning rate at optimizer step ``step``.

        The schedule is a pure function of ``global_step`` (applied in ``on_train_batch_start``)
        rather than a stateful ``LRScheduler``: Lightning saves mid-epoch checkpoints in
        ``on_train_batch_end``, *before* it steps step-interval schedulers, so a scheduler restored
        from such a checkpoint runs one step behind and resume is no longer bit-identical.
        ``global_step`` is restored exactly.
        """
        return 1.0

    def apply_lr_schedule(self, optimizers, step: int) -> None:
        """Set every param group's lr to its initial lr times :meth:`lr_factor` at ``step``
        (also for loops outside Lightning, e.g. benchmarks)."""
        factor = self.lr_factor(step)
        for opt in optimizers:
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])
                group["lr"] = group["initial_lr"] * factor

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.apply_lr_schedule(self.trainer.optimizers if self.trainer is not None else [], int(self.global_step))
        if self.trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)

    # ------------------------------------------------------------------ training
    def _record_skips(self, batch: Batch) -> bool:
        if batch.skipped:
            self._skipped.extend(batch.skipped)
        return len(batch) == 0

    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def training_step(self, batch: Batch, batch_idx: int):
        world = self._world_size()
        if self._record_skips(batch):
            if world > 1:
                # Every rank must run backward (DDP all-reduces gradients in lock-step): a rank whose
                # whole batch was skipped contributes a zero loss that touches every parameter.
                return sum((p.sum() * 0.0 for p in self.parameters() if p.requires_grad), torch.zeros((), device=self.device))
            return None
        self._last_batch_ids = list(batch.object_ids)
        terms = self.training_losses(batch)
        bad = [k for k, v in terms.items() if not torch.isfinite(v.detach()).all()]
        if world > 1:
            # The skip decision must be the same on every rank, or the ranks' collectives desync.
            flags = self.all_gather(torch.tensor(float(bool(bad)), device=self.device)).reshape(-1)
            bad_ranks = [r for r, f in enumerate(flags.tolist()) if f > 0]
            if bad_ranks and not bad:
                self._on_nonfinite(f"loss terms on rank(s) {bad_ranks}", batch.object_ids)
                return None
        if bad:
            self._on_nonfinite(f"loss terms {bad}", batch.object_ids)
            return None
        self._consecutive_nonfinite = 0
        B = len(batch)
        for k, v in terms.items():
            # sync_dist: the logged curve is the mean over ranks (= the global batch's loss).
            self.log(f"train/{k}", v.detach(), prog_bar=k in ("loss", "psnr"), batch_size=B, sync_dist=world > 1)
        return terms["loss"]

    def on_before_optimizer_step(self, optimizer) -> None:
        bad = [n for n, p in self.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            # Dropping every gradient makes the optimizer skip all parameters this step
            # (Adam/AdamW skip params whose grad is None), the closest thing to "no step".
            for p in self.parameters():
                p.grad = None
            self._on_nonfinite(f"gradients of {len(bad)} parameters (e.g. {bad[:3]})", self._last_batch_ids)

    def _on_nonfinite(self, what: str, object_ids: list[str]) -> None:
        self.nonfinite_steps += 1
        self._consecutive_nonfinite += 1
        msg = f"non-finite {what} at global step {self.global_step} (objects {list(object_ids)})"
        if self.nonfinite.policy == "halt" or self._consecutive_nonfinite >= self.nonfinite.max_consecutive:
            raise NonFiniteLossError(
                msg + ("" if self.nonfinite.policy == "halt" else f"; {self._consecutive_nonfinite} consecutive steps, halting")
            )
        log.warning("%s; step skipped (%d so far)", msg, self.nonfinite_steps)

    def on_train_epoch_end(self) -> None:
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), sync_dist=False)
        self._report_skips("train")

    def _report_skips(self, split: str) -> None:
        n = len(self._skipped)
        if self.trainer is not None and self.trainer.logger is not None:
            # Summed over ranks: each rank skips its own shard's bad samples.
            self.log(f"{split}/skipped_samples", float(n), sync_dist=self._world_size() > 1, reduce_fx="sum")
        if n:
            ids = sorted({i for i, _ in self._skipped})
            log.warning("%s: skipped %d bad samples this epoch (%s); first reason: %s", split, n, ", ".join(ids[:5]), self._skipped[0][1])
        self._skipped = []

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: Batch, split: str) -> None:
        if self._record_skips(batch):
            return
        out = self.render_views(batch, batch.targets.cameras)
        pred = out["rgb"].clamp(0, 1)
        if self.evaluation is not None:
            alpha = out.get("alpha")
            self.evaluation.update_views(batch.object_ids, pred, batch.targets.images, batch.targets.masks, alpha)
            if batch.geometry.surface_points is not None:
                self._eval_geometry(batch)
        if not self._vis_done:
            self._save_grid(batch, pred, split)
            self._vis_done = True

    #: the metrics :meth:`EvaluationProtocol.update_geometry` reports (named when they are missing)
    GEOMETRY_METRICS = GEOMETRY_METRICS

    def _eval_geometry(self, batch: Batch) -> None:
        """Feed :meth:`predict_geometry` to the protocol; objects it gives no geometry for are
        recorded with the reason (``metrics.json``) instead of silently leaving the mean."""
        geo = self.predict_geometry(batch)
        ids = list(batch.object_ids)
        if geo is None:
            self.evaluation.note(ids, self.GEOMETRY_METRICS[:4], f"{type(self).__name__} predicts no geometry")
            return
        names = geometry_metric_names(batch, geo.get("normals") is not None)
        valid = geo.get("valid")
        keep = list(range(len(ids))) if valid is None else [i for i, v in enumerate(valid.tolist()) if v]
        dropped = [ids[i] for i in range(len(ids)) if i not in keep]
        if dropped:
            self.evaluation.note(dropped, names, str(geo.get("invalid_reason") or "no geometry"))
        if not keep:
            return
        sel = torch.tensor(keep, device=geo["points"].device)

        def pick(x):
            return None if x is None else x.index_select(0, sel.to(x.device))

        self.evaluation.update_geometry(
            [ids[i] for i in keep], pick(geo["points"]), pick(batch.geometry.surface_points),
            pick(geo.get("normals")), pick(batch.geometry.surface_normals),
        )

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._vis_done = False

    on_test_epoch_start = on_validation_epoch_start

    def _finish_eval(self, split: str) -> dict[str, float]:
        self._report_skips(split)
        if self.evaluation is None:
            return {}
        results = self.evaluation.compute()
        for k, v in results.items():
            if v is not None and math.isfinite(v):
                self.log(f"{split}/{k}", float(v), sync_dist=False, rank_zero_only=True)
        if split == "test" and self.trainer.is_global_zero:
            self.evaluation.write(self._out_dir() / "test")
        self.evaluation.reset()
        return results

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")

    # ------------------------------------------------------------------ predict / export
    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict[str, str]]:
        if self._record_skips(batch):
            return []
        from recon3d.render.isosurface import EmptySurfaceError

        out_dir = Path(getattr(self, "_export_root", None) or self._out_dir() / "predict")
        results = []
        for i in range(len(batch)):
            try:
                results.append(self.export_object(batch, i, out_dir / batch.object_ids[i]))
            except EmptySurfaceError as err:
                # An under-trained model has no surface to export for this object: a counted skip
                # with its reason, not the end of the whole export.
                log.warning("export: %s skipped, no surface (%s)", batch.object_ids[i], err)
                results.append({"skipped": f"no surface: {err}"})
        return results

    # ------------------------------------------------------------------ helpers
    def _out_dir(self) -> Path:
        trainer = self.trainer
        if trainer is not None and trainer.logger is not None and trainer.logger.log_dir:
            return Path(trainer.logger.log_dir)
        return Path(trainer.default_root_dir if trainer is not None else "outputs")

    def _save_grid(self, batch: Batch, pred: torch.Tensor, split: str) -> None:
        if self.trainer is None or not self.trainer.is_global_zero or getattr(self.trainer, "sanity_checking", False):
            return
        from recon3d.utils.images import save_view_grid

        k = min(self.vis_views, pred.shape[1])
        path = self._out_dir() / f"{split}_grid_epoch{self.current_epoch:04d}_step{self.global_step:07d}.png"
        save_view_grid(path, batch.inputs.images, pred[:, :k], batch.targets.images[:, :k], object_ids=list(batch.object_ids))
