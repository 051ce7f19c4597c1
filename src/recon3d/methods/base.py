"""``ReconModule``: what every recon3d method shares.

A method subclasses it and implements

- :meth:`training_losses` ``(batch) -> dict`` of named scalar terms with the total under ``"loss"``;
- :meth:`reconstruct` ``(batch) ->`` :class:`~recon3d.representations.Reconstruction`: the
  representation(s) of every object of the batch (Triplanes, a field, Gaussians, Meshes,
  SparseVoxels ...), optional predicted cameras and an optional canonical-to-world transform.

Validation, test and predict call :meth:`reconstruct` **once per batch** and derive the rest
from it, each with a default a method overrides only where it needs to:

- :meth:`render_reconstruction` ``(rec, cameras) ->`` :class:`~recon3d.representations.RenderOutput`
  (default: :func:`recon3d.render.render` of the primary representation);
- :meth:`reconstruction_geometry` ``(rec, batch) -> dict`` with ``"points" (B,P,3)`` (and
  ``"normals"``; optionally ``"valid" (B,)`` and ``"invalid_reason"``) for the geometry metrics
  (default: surface samples of a :class:`~recon3d.representations.Meshes` in the reconstruction);
- :meth:`export_reconstruction` ``(rec, out_dir, suffix)`` for one object (default: the files
  :func:`recon3d.render.export.export_representation` writes for :attr:`EXPORT_REPRESENTATION`);
- :attr:`refiners`: test-time :class:`~recon3d.models.refiners.Refiner` s applied per object at
  predict time, each refined variant exported with the refiner's name as suffix.

The protocol is also fed the reconstruction's predicted cameras (pose metrics), meshes (against
the ground-truth mesh files, with volumetric IoU) and sparse voxels (occupancy IoU at the
ground-truth SDF samples) when it has them. Generators draw each object's sample from
:func:`~recon3d.representations.reconstruction.object_seed` (``eval_seed``), so evaluation is
reproducible; ``validation_mode: loss`` validates on the training losses alone (a flow stage).
The batch-level helpers :meth:`render_views`, :meth:`predict_geometry` and
:meth:`export_object` remain for callers outside the loops (one reconstruct each).

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

from recon3d.data.batch import Batch, Views
from recon3d.data.cameras import Cameras
from recon3d.errors import CheckpointError, ConfigError, Recon3DError
from recon3d.representations import Meshes, RenderOutput, SparseVoxels
from recon3d.representations.reconstruction import Reconstruction, object_seeds

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


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup_steps`` (``(step + 1) / warmup``),
    then cosine decay from 1 to 0 at ``total_steps`` (kept at 0 past it)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))


#: the metrics :meth:`EvaluationProtocol.update_geometry` reports (named when they are missing)
GEOMETRY_METRICS = ("cd", "fscore", "precision", "recall", "nc")


def depth_mse(pred: torch.Tensor, target: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Mean squared depth error over the pixels ``where`` that also have a target depth (> 0).

    recon3d's depth maps are 0 where there is no surface, and a view's mask and depth need not
    agree at the silhouette: resized views have antialiased masks (bilinear) but depths picked
    from one pixel (nearest), so an edge pixel can be object in the mask with depth 0. Its error,
    the whole camera distance squared, would outweigh every true pixel (in the GTR demo's data 2 %
    of the object's pixels held ~90 % of the loss) and pull the surface towards the camera.
    """
    valid = where & (target > 0)
    return ((pred - target).square() * valid).sum() / valid.sum().clamp_min(1)


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
        validation_mode: ``"render"`` (reconstruct, render and score with ``evaluation``) or
            ``"loss"`` (log the training losses on the validation batches, ``val/<term>``; for
            stages whose output is not an image, e.g. a flow model's velocity).
        eval_seed: base of the per-object seeds stochastic methods sample with in evaluation and
            predict (:func:`~recon3d.representations.reconstruction.object_seed`).

    Run-time options: :attr:`RUNTIME_OPTIONS` names the init args that change how a trained model
    is evaluated, rendered or exported, not the model itself or how it trains. With a checkpoint
    (``--ckpt_path``, ``recon3d export --ckpt``) the command line's values of these win, while
    every other hyper-parameter comes from the checkpoint (:mod:`recon3d.cli`). A subclass
    extends the set: ``RUNTIME_OPTIONS = ReconModule.RUNTIME_OPTIONS | {"export_resolution"}``.
    """

    #: Init args the command line sets even when a checkpoint is given (class docstring).
    RUNTIME_OPTIONS: frozenset[str] = frozenset({"evaluation", "vis_views", "validation_mode", "eval_seed"})

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
        validation_mode: Literal["render", "loss"] = "render",
        eval_seed: int = 0,
    ):
        super().__init__()
        if validation_mode not in ("render", "loss"):
            raise ConfigError(f"model.validation_mode: expected 'render' or 'loss', got {validation_mode!r}")
        self.validation_mode = validation_mode
        self.eval_seed = int(eval_seed)
        #: test-time refiners applied per object at predict time (:meth:`predict_step`).
        self.refiners: list = []
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
        self._vis_sample: tuple | None = None  # this rank's first evaluation batch, for the grid
        self._last_batch_ids: list[str] = []

    # ------------------------------------------------------------------ to implement
    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement training_losses(batch)")

    def reconstruct(self, batch: Batch) -> Reconstruction:
        """The reconstruction of every object of ``batch`` (module docstring); no gradients needed.
        Stochastic methods seed each object with :meth:`object_seeds`."""
        raise NotImplementedError(f"{type(self).__name__} must implement reconstruct(batch) -> Reconstruction")

    # ------------------------------------------------------------------ derived from reconstruct
    def object_seeds(self, batch: Batch) -> list[int]:
        """Per-object seeds (from the ids and ``eval_seed``) for sampling in evaluation / predict."""
        return object_seeds(list(batch.object_ids), self.eval_seed)

    def render_reconstruction(self, rec: Reconstruction, cameras: Cameras) -> RenderOutput:
        """Render ``rec`` into ``cameras (B, V)``: by default :func:`recon3d.render.render` of the
        primary representation on a white background."""
        from recon3d.render import render

        return render(rec.representation, cameras, "white")

    def reconstruction_meshes(self, rec: Reconstruction, batch: Batch) -> Meshes | None:
        """The reconstruction's surface as :class:`Meshes` (one per object, possibly empty), for
        the geometry metrics; default: a :class:`Meshes` in ``rec``, else None. Methods whose
        representation is a field extract it here (GTR, M3D)."""
        return rec.find(Meshes)

    def reconstruction_geometry(self, rec: Reconstruction, batch: Batch) -> dict[str, torch.Tensor] | None:
        """Surface samples for the geometry metrics (module docstring). Default: area-weighted
        samples (with face normals, per-object seeded) of :meth:`reconstruction_meshes`; objects
        whose mesh is empty are marked invalid. None when there is no mesh."""
        from recon3d.metrics.geometry import sample_surface

        meshes = self.reconstruction_meshes(rec, batch)
        if meshes is None:
            return None
        n = _num_points(batch.geometry.surface_points, 4096)
        pts, nrm, valid = [], [], []
        for b, seed in enumerate(object_seeds(rec.object_ids, self.eval_seed)):
            v, f = meshes.verts[b], meshes.faces[b]
            if f.shape[0] == 0:
                pts.append(torch.zeros(n, 3, device=self.device))
                nrm.append(torch.zeros(n, 3, device=self.device))
                valid.append(False)
                continue
            p, q = sample_surface(v.float().cpu(), f.cpu(), n, generator=torch.Generator().manual_seed(seed))
            pts.append(p.to(self.device))
            nrm.append(q.to(self.device))
            valid.append(True)
        return {"points": torch.stack(pts), "normals": torch.stack(nrm), "valid": torch.tensor(valid),
                "invalid_reason": self.empty_surface_reason}

    #: why an object without faces gets no geometry metric (``metrics.json``); methods say more.
    empty_surface_reason: str = "empty mesh: the reconstruction has no surface"

    def export_reconstruction(self, rec: Reconstruction, out_dir: Path, suffix: str = "", views: Views | None = None) -> dict[str, str]:
        """Write the one object of ``rec`` under ``out_dir``; return ``{name: path or note}``.
        ``views``: the object's input views (batch of one), e.g. to place a turntable.
        Default: the :attr:`EXPORT_REPRESENTATION` in ``rec`` (else its primary representation)
        in :attr:`export_formats` (default: every format the representation supports except
        the turntable videos)."""
        from recon3d.render.export import export_formats, export_representation

        rep = rec.find(self.EXPORT_REPRESENTATION) if self.EXPORT_REPRESENTATION is not None else None
        rep = rec.representation if rep is None else rep
        formats = self.export_formats or tuple(f for f in export_formats(type(rep)) if f not in ("gif", "mp4"))
        if not formats:
            return {}
        return export_representation(rep, Path(out_dir), formats, suffix=suffix)

    def render_views(self, batch: Batch, cameras: Cameras) -> RenderOutput:
        """Render every object of ``batch`` into ``cameras`` (one :meth:`reconstruct`)."""
        return self.render_reconstruction(self.reconstruct(batch), cameras)

    def predict_geometry(self, batch: Batch) -> dict[str, torch.Tensor] | None:
        """:meth:`reconstruction_geometry` of the batch's reconstruction (one :meth:`reconstruct`)."""
        return self.reconstruction_geometry(self.reconstruct(batch), batch)

    def export_object(self, batch: Batch, index: int, out_dir: Path) -> dict[str, str]:
        """Export object ``index`` of ``batch`` (and its refined variants) under ``out_dir``.
        Reconstructs the whole batch: for many objects use :meth:`predict_step`, which
        reconstructs once per batch."""
        return self._export_one(self.reconstruct(batch).select(index), batch, index, Path(out_dir))

    def _export_one(self, rec: Reconstruction, batch: Batch, index: int, out_dir: Path) -> dict[str, str]:
        views = batch.inputs.select(index)
        files = dict(self.export_reconstruction(rec, out_dir, views=views))
        for refiner in self.refiners:
            rec = refiner.refine(rec, views)
            files.update(self.export_reconstruction(rec, out_dir, suffix=f"_{refiner.name}", views=views))
            files.update(refiner.summary(rec))
        return files

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
        if world > 1:
            # DDP needs a gradient for every parameter at every step, and staged losses leave some
            # unused (M3D's SDF-only stage never touches the colour head): without this, DDP stops
            # with "parameters that were not used". The zero-weighted term changes no gradient of
            # a used parameter; unused ones get a zero gradient instead of None (so AdamW's decay
            # reaches them under DDP, where a single process skips them).
            return terms["loss"] + 0.0 * sum(p.sum() for p in self.parameters() if p.requires_grad)
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
        if self.validation_mode == "loss" and split == "val":
            terms = self.training_losses(batch)
            for k, v in terms.items():
                self.log(f"val/{k}", v.detach(), batch_size=len(batch), sync_dist=self._world_size() > 1)
            return
        rec = self.reconstruct(batch)  # once: renders, geometry, poses and grids all come from it
        out = self.render_reconstruction(rec, batch.targets.cameras)
        pred = out["rgb"].clamp(0, 1)
        if self.evaluation is not None:
            self.evaluation.update_views(batch.object_ids, pred, batch.targets.images, batch.targets.masks, out.get("alpha"))
            self._eval_poses(rec, batch)
            if batch.geometry.surface_points is not None or batch.geometry.mesh_paths:
                self._eval_geometry(batch, rec)
            self._eval_occupancy(rec, batch)
        self._save_grid(batch, pred, split)

    #: the metrics :meth:`EvaluationProtocol.update_geometry` reports (named when they are missing)
    GEOMETRY_METRICS = GEOMETRY_METRICS

    def _eval_poses(self, rec: Reconstruction, batch: Batch) -> None:
        """Predicted input cameras vs the true ones (``rre``, ``te``, ``acc@k``), when both exist.
        A reconstruction whose ``extras["pose_caveat"]`` says why its cameras are not a measurement
        of the method (e.g. an untrained camera head) gets those metrics flagged
        (:meth:`~recon3d.metrics.protocol.EvaluationProtocol.flag`), values kept."""
        true = batch.inputs.cameras
        if rec.cameras is None or true is None or true.batch_shape[1] < 2:
            return
        self.evaluation.update_poses(batch.object_ids, rec.cameras.c2w, true.c2w)
        caveat = (rec.extras or {}).get("pose_caveat")
        if caveat:
            from recon3d.metrics.protocol import POSE_METRICS

            self.evaluation.flag(batch.object_ids, POSE_METRICS, str(caveat))

    def _eval_occupancy(self, rec: Reconstruction, batch: Batch) -> None:
        """Occupancy IoU of the reconstruction's sparse voxels at the ground-truth SDF samples."""
        voxels = rec.find(SparseVoxels)
        pts, sdf = batch.geometry.sdf_points, batch.geometry.sdf_values
        if voxels is None or pts is None or sdf is None:
            return
        pred = torch.stack([voxels[b].occupied(p.to(voxels.coords.device)) for b, p in enumerate(pts)])
        gt = torch.stack([s < 0 for s in sdf])
        self.evaluation.update_occupancy(batch.object_ids, pred, gt.to(pred.device))

    def _eval_geometry(self, batch: Batch, rec: Reconstruction | None = None) -> None:
        """Feed the reconstruction's geometry to the protocol: its meshes against the ground-truth
        mesh files when both exist (adds the volumetric IoU), else :meth:`reconstruction_geometry`
        against the ground-truth surface samples. Objects it gives no geometry for are recorded
        with the reason (``metrics.json``) instead of silently leaving the mean."""
        rec = self.reconstruct(batch) if rec is None else rec
        ids = list(batch.object_ids)
        paths = batch.geometry.mesh_paths
        meshes = self.reconstruction_meshes(rec, batch) if paths and all(paths) else None
        if meshes is not None:
            keep = [i for i, n in enumerate(meshes.num_faces) if n > 0]
            dropped = [ids[i] for i in range(len(ids)) if i not in keep]
            if dropped:
                self.evaluation.note(dropped, self.GEOMETRY_METRICS + ("iou",), self.empty_surface_reason)
            if keep:
                gt = _load_meshes([paths[i] for i in keep])
                self.evaluation.update_meshes([ids[i] for i in keep], [(meshes.verts[i], meshes.faces[i]) for i in keep], gt)
            return
        if batch.geometry.surface_points is None:
            return
        geo = self.reconstruction_geometry(rec, batch)
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

        def pick(x):
            if x is None:
                return None
            if isinstance(x, (list, tuple)):
                return [x[i] for i in keep]
            return x.index_select(0, torch.tensor(keep, device=x.device))

        self.evaluation.update_geometry(
            [ids[i] for i in keep], pick(geo["points"]), pick(batch.geometry.surface_points),
            pick(geo.get("normals")), pick(batch.geometry.surface_normals),
        )

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._vis_sample = None

    on_test_epoch_start = on_validation_epoch_start

    def _finish_eval(self, split: str) -> dict[str, float]:
        self._report_skips(split)
        self._write_grid(split)
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
        """Reconstruct the batch once, then export every object (and its refined variants)."""
        if self._record_skips(batch):
            return []
        from recon3d.render.isosurface import EmptySurfaceError

        out_dir = Path(getattr(self, "_export_root", None) or self._out_dir() / "predict")
        rec = self.reconstruct(batch)
        results = []
        for i in range(len(batch)):
            try:
                results.append(self._export_one(rec.select(i), batch, i, out_dir / batch.object_ids[i]))
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
        """Keep this rank's first evaluation batch of the epoch (inputs, up to ``vis_views``
        predictions and targets, on the CPU) for its grid, written by :meth:`_write_grid`; later
        batches, a module without a trainer and the sanity check keep nothing."""
        if self._vis_sample is not None or self._trainer is None or getattr(self.trainer, "sanity_checking", False):
            return
        k = min(self.vis_views, pred.shape[1])
        self._vis_sample = (batch.inputs.images.detach().cpu(), pred[:, :k].detach().cpu(),
                            batch.targets.images[:, :k].detach().cpu(), list(batch.object_ids))

    def _write_grid(self, split: str) -> None:
        """The epoch's PNG grid of the first evaluation batch, written by rank 0.

        Under DDP each of the ``W`` ranks contributes the first ``ceil(n / W)`` objects of its
        first batch of ``n`` (gathered to every rank, so the payload stays about one batch of
        images), and objects that the distributed sampler repeated to even out the ranks appear
        once: the grid shows about as many objects as one process would, drawn from every rank,
        where it used to show rank 0's share only. Collective under DDP: every rank calls it at
        the end of the epoch."""
        if self._trainer is None or getattr(self.trainer, "sanity_checking", False):
            return
        sample, self._vis_sample = self._vis_sample, None
        samples = [sample]
        world = self._world_size()
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            if sample is not None:
                per = -(-len(sample[3]) // world)
                sample = tuple(x[:per] for x in sample)
            samples = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(samples, sample)
        if not self.trainer.is_global_zero:
            return
        seen: set[str] = set()
        keep = []  # (sample, index) of each object's first appearance, rank order
        for smp in samples:
            for i, oid in enumerate(smp[3] if smp is not None else []):
                if oid not in seen:
                    seen.add(oid)
                    keep.append((smp, i))
        # ranks whose views differ in count or size from the first (mixed datasets) stay out of it
        keep = [(smp, i) for smp, i in keep if all(smp[j].shape[1:] == keep[0][0][j].shape[1:] for j in range(3))]
        if not keep:
            return
        from recon3d.utils.images import save_view_grid

        inputs, preds, targets = (torch.stack([smp[j][i] for smp, i in keep]) for j in range(3))
        path = self._out_dir() / f"{split}_grid_epoch{self.current_epoch:04d}_step{self.global_step:07d}.png"
        save_view_grid(path, inputs, preds, targets, object_ids=[smp[3][i] for smp, i in keep])


def _num_points(surface_points, default: int) -> int:
    """Points per object to sample: as many as the ground truth has (the first object's)."""
    if surface_points is None:
        return default
    return int(surface_points[0].shape[0])


def _load_meshes(paths: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    import trimesh

    out = []
    for p in paths:
        m = trimesh.load(p, force="mesh", process=False)
        out.append((torch.as_tensor(m.vertices, dtype=torch.float32), torch.as_tensor(m.faces, dtype=torch.int64)))
    return out


def own_instance(part: Any) -> Any:
    """``part`` itself, or, for a ``jsonargparse.lazy_instance`` default, a freshly built instance.

    A lazy default in a signature is one object shared by every call that omits the argument,
    and it builds itself only when one of its methods is called (attribute reads before that
    fail). Two ``GTRModule()`` built in Python would otherwise share one generator; the CLI
    always passes its own instances, so it is unaffected."""
    from jsonargparse._typehints import _LazyInitBaseClass  # the type lazy_instance returns

    if isinstance(part, _LazyInitBaseClass):
        return part._lazy_class_type(**dict(part.lazy_get_init_args()))
    return part
