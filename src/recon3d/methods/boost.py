"""MVBoost's boosting stage (Liu et al., "MVBoost: Boost 3D Reconstruction with Multi-View
Refinement", §3.3 eq. 6, supplementary §6–8) for **any** recon3d reconstruction method.

:class:`BoostModule` wraps a trained base method (a :class:`~recon3d.methods.base.ReconModule`
given as a part, ``class_path`` + ``init_args``), freezes every one of its weights, adds LoRA
adapters (:mod:`recon3d.adapters.lora`, over peft) to the sub-modules a regular expression
selects, and trains only the adapters on pairs (input views ``C^π``, supervision views ``C↑^π``)::

    φ* = argmin_φ  E [ L( g(R_φ*(C^π), π), C↑^π ) ],     L = MSE + λ LPIPS          (eq. 6)

where ``R_φ*`` is the base network with its adapters and ``g(·, π)`` renders the reconstruction
at the supervision cameras. The reconstruction, its renders, geometry, exports and test-time
refiners are the base method's own, computed with the adapters active.

Where the loss is computed (``objective``):

``base`` (default)
    The base method's own :meth:`~recon3d.methods.base.ReconModule.training_losses` on the batch
    (``batch.inputs`` = ``C^π``, ``batch.targets`` = ``C↑^π``). For a feed-forward
    reconstruction model that *is* eq. 6 -- reconstruct from the inputs, render at the targets,
    MSE + λ LPIPS (GTR's NeRF stage: GTR eq. 1, LGM: its MSE + LPIPS, plus its alpha term) --
    and it keeps each method's own way of making that affordable and differentiable (GTR
    renders random patches, its mesh stage a differentiable iso-surface), which an
    evaluation-time render path does not offer (GTR's evaluation render of a 512² view with 256
    samples per ray would not fit in memory with gradients). Every method implements it, so
    this is what makes "any model" true. λ is then the base's (set it in the base's block).
``render``
    Eq. 6 computed here: :meth:`reconstruct` → :meth:`render_reconstruction` at
    ``batch.targets.cameras`` → ``MSE(rgb, C↑^π) + lambda_lpips · LPIPS``. For bases whose
    training loss is not a render loss (a flow model's velocity loss), where the
    reconstruction and render path is differentiable; a base whose path gives the adapters no
    gradient is refused with one line.

Which sub-modules get adapters: ``pattern`` (``re.fullmatch`` on names relative to
``submodule``, a dotted path inside the base, e.g. ``net`` for GTR; a list means module names as
in :class:`~recon3d.adapters.LoRAConfig`). Without ``pattern`` the base class's default from
:data:`DEFAULT_TARGETS` is used -- the cross-view attention, as the paper does: LGM's
``MVAttention`` qkv/proj, GTR's joint triplane/view self-attention (supplementary §8 boosts
OpenLRM's transformer decoder the same way). A pattern that matches nothing is one
:class:`~recon3d.errors.ConfigError` line listing (a summary of) the sub-modules that exist; a
match inside a frozen pretrained part of the base (which checkpoints leave out and re-read from
its own files) is refused, since its adapters would not be saved.

Weights and files:

- ``base_checkpoint``: the trained base, loaded at construction with the base method's normal
  loading (:func:`~recon3d.utils.checkpoint.load_weights_into`, strict, the base's
  ``init_weights_ignore``) *before* the adapters are added; a missing file is one
  :class:`~recon3d.errors.CheckpointError` line.
- ``official_weights``: instead, the base method's *released* weights (GTR's ``ckpt.pth``, LGM's
  ``model_fp16_fixrot.safetensors``) through that method's official importer
  (:data:`OFFICIAL_IMPORTERS`; strict explicit key maps, fp16 to float32) -- what MVBoost boosts;
- the Lightning checkpoint holds everything (frozen base + adapters), so ``--ckpt_path`` resume,
  ``test``/``predict``/``export`` work as for every method;
- at the end of ``fit`` the adapters alone are written (atomically, rank 0) to
  ``<run folder>/<adapter_file>`` (:func:`~recon3d.adapters.save_lora`: safetensors with the
  rank/alpha/targets header); ``adapters: PATH`` loads such a file at construction (a boosted
  model from a base checkpoint + an adapter file, no Lightning checkpoint needed), and
  :func:`~recon3d.adapters.load_lora` puts it into any fresh base built the same way;
- :meth:`merge_adapters` folds the adapters into the base weights (``W += alpha/r · B A``) and
  leaves a plain base; ``merge_at_inference: true`` does it at the start of test / predict
  (also ``recon3d export ... -- --model.init_args.merge_at_inference true``).

Every non-adapter weight stays bit-identical while boosting: the base's parameters have
``requires_grad=False`` and are not in the optimiser, and BatchNorm layers of the base are kept in
eval mode so their running statistics do not move (:meth:`train`). The adapter ``B`` starts at
zero, so before the first step the boosted model computes exactly the base model's outputs.

Paper values: rank 32 (supplementary §6); alpha, dropout and the optimiser are not given
(defaults here: alpha = rank, i.e. scaling 1, no dropout, AdamW lr 1e-4).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from recon3d.adapters import LoRAConfig
from recon3d.data.batch import Batch, Views
from recon3d.data.cameras import Cameras
from recon3d.errors import CheckpointError, ConfigError
from recon3d.methods._lora_stage import LoRAStageMixin, check_adapter_file
from recon3d.methods.base import NonFiniteGuard, ReconModule
from recon3d.metrics.protocol import EvaluationProtocol
from recon3d.representations import Meshes, RenderOutput
from recon3d.representations.reconstruction import Reconstruction
from recon3d.utils.checks import check_adamw_options, check_option

__all__ = ["BoostModule", "DEFAULT_TARGETS", "OFFICIAL_IMPORTERS"]

log = logging.getLogger(__name__)

#: ``{base class name: (submodule, pattern)}``: where the cross-view attention of each shipped
#: method lives, used when ``pattern`` is not given. Keyed by class name (methods never import
#: each other). A method outside this table may declare ``BOOST_TARGETS = (submodule, pattern)``.
DEFAULT_TARGETS: dict[str, tuple[str, str]] = {
    # GTR: joint self-attention over [triplane tokens | all views' tokens] in every block
    # (models/gtr/generator.py SelfAttention: to_q, to_k, to_v, to_out); no cross-attention exists.
    "GTRModule": ("net", r"generator\.blocks\.\d+\.attn\.to_(q|k|v|out)"),
    # LGM: MVAttention (tokens of all views jointly) in the U-Net's attention levels.
    "LGMModule": ("net", r"unet\..*attns\.\d+\.attn\.(qkv|proj)"),
}


def _import_gtr(path: str, net: torch.nn.Module) -> None:
    from recon3d.models.gtr.pretrained import load_official_gtr

    load_official_gtr(path, net=net)


def _import_lgm(path: str, net: torch.nn.Module) -> None:
    from recon3d.models.lgm.pretrained import load_official_lgm

    load_official_lgm(path, net=net)


#: ``{base class name: (submodule, importer(path, net))}``: where each shipped method's released
#: weights go and the strict importer that maps their keys (``official_weights``).
OFFICIAL_IMPORTERS = {
    "GTRModule": ("net", _import_gtr),   # snap-research/gtr ckpt.pth -> GTRNetwork
    "LGMModule": ("net", _import_lgm),   # 3DTopia/LGM model_fp16_fixrot.safetensors -> LGMNetwork
}


class BoostModule(LoRAStageMixin, ReconModule):
    """LoRA boosting of a base reconstruction method (module docstring).

    The adapters' life cycle and file formats are :class:`~recon3d.methods._lora_stage.LoRAStageMixin`'s
    (owner: the base; adapters on ``base.<submodule>``); here: the base as a part, its weights,
    the default targets, the refusal of targets in frozen pretrained parts, the two objectives,
    the BatchNorm statistics kept frozen, and the base's reconstruction path.

    Args:
        base: the method to boost (any :class:`ReconModule`; ``class_path`` + ``init_args`` in
            YAML). Its ``evaluation`` is moved to this module when this module has none.
        base_checkpoint: trained weights of ``base`` (a ``.ckpt`` of that method, or a
            ``.safetensors``/``.pt`` of its state dict); None: the base as built (tests).
        official_weights: the base method's released weights file, loaded with its official
            importer (:data:`OFFICIAL_IMPORTERS`); exclusive with ``base_checkpoint``.
        pattern: sub-modules that get adapters (regex on names relative to ``submodule``, or a
            list of names); None: the base class's default (:data:`DEFAULT_TARGETS`).
        submodule: dotted path of the part of ``base`` that the pattern and the adapter file's
            keys are relative to (``""``: the base itself); None: with ``pattern`` None the
            default's, else ``""``.
        exclude: names removed from the matches (same rules as ``pattern``).
        rank: LoRA rank r (supplementary §6: 32).
        alpha: LoRA alpha; the update is scaled by ``alpha / rank``.
        dropout: dropout on the adapters' input while training.
        objective: ``"base"`` (the base's training losses) or ``"render"`` (eq. 6 here); module
            docstring.
        lambda_lpips: λ of the ``render`` objective (LPIPS-VGG needs its weights in
            ``lpips_weights_dir``; 0 switches it off). Unused by ``base`` (the base's λ applies).
        lpips_weights_dir: folder of the LPIPS VGG backbone and heads (:mod:`recon3d.metrics.lpips`).
        lpips_resolution: the ``render`` objective's LPIPS inputs are resized to this (LGM: 256).
        lr, weight_decay, betas: AdamW over the adapter weights.
        warmup_steps: linear warm-up, then cosine decay to 0 at the last step.
        adapters: an adapter file (:func:`~recon3d.adapters.save_lora`) loaded at construction.
        adapter_file: name of the adapter-only file written into the run folder at the end of
            ``fit`` (None: not written).
        merge_at_inference: merge the adapters into the base weights at the start of test and
            predict (:meth:`merge_adapters`).
        evaluation, init_weights, init_weights_ignore, nonfinite, vis_views, validation_mode, eval_seed: see
            :class:`~recon3d.methods.base.ReconModule` (``init_weights`` is a whole boosted model).

    Run-time options: the evaluation settings, the merge switch, the LPIPS folder, and
    ``base_checkpoint`` / ``adapters`` (with a checkpoint they only initialise weights the
    checkpoint then replaces, so the command line may point them elsewhere or to null; also
    ``official_weights``).
    """

    RUNTIME_OPTIONS = ReconModule.RUNTIME_OPTIONS | {"merge_at_inference", "lpips_weights_dir", "base_checkpoint",
                                                     "official_weights", "adapters"}

    def __init__(
        self,
        base: ReconModule,
        base_checkpoint: str | None = None,
        official_weights: str | None = None,
        pattern: str | list[str] | None = None,
        submodule: str | None = None,
        exclude: str | list[str] | None = None,
        rank: int = 32,
        alpha: float = 32.0,
        dropout: float = 0.0,
        objective: Literal["base", "render"] = "base",
        lambda_lpips: float = 1.0,
        lpips_weights_dir: str | None = None,
        lpips_resolution: int = 256,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        adapters: str | None = None,
        adapter_file: str | None = "adapters.safetensors",
        merge_at_inference: bool = False,
        evaluation: EvaluationProtocol | None = None,
        init_weights: str | None = None,
        nonfinite: NonFiniteGuard | None = None,
        vis_views: int = 4,
        init_weights_ignore: list[str] | None = None,
        validation_mode: Literal["render", "loss"] = "render",
        eval_seed: int = 0,
    ):
        if not isinstance(base, ReconModule):
            raise ConfigError(f"model.base: expected a recon3d ReconModule (a method's class_path + init_args), got {type(base).__name__}")
        if evaluation is None:  # one protocol, this module's: the base's would be fed by no loop
            evaluation = base.evaluation
        base.evaluation = None
        super().__init__(evaluation=evaluation, init_weights=init_weights, nonfinite=nonfinite, vis_views=vis_views,
                         init_weights_ignore=init_weights_ignore, validation_mode=validation_mode, eval_seed=eval_seed)
        if objective not in ("base", "render"):
            raise ConfigError(f"model.objective: expected 'base' or 'render', got {objective!r}")
        check_adamw_options(lr, weight_decay, betas, warmup_steps)
        check_option("model.lambda_lpips", lambda_lpips, 0.0)
        check_option("model.lpips_resolution", lpips_resolution, 1, integer=True)
        check_adapter_file(adapter_file)
        self.save_hyperparameters()  # base: its config (recon3d fit) or left out, never pickled (ReconModule)

        if base_checkpoint is not None and official_weights is not None:
            raise ConfigError("model.official_weights: give the base's weights once, as base_checkpoint (a recon3d "
                              "checkpoint) or official_weights (the released file), not both")
        if base_checkpoint is not None:
            _load_base(base, base_checkpoint)
        if official_weights is not None:
            _load_official(base, official_weights)
        self.base = base
        self.submodule, pattern = _resolve_targets(base, pattern, submodule)
        where = f"{type(base).__name__}.{self.submodule}" if self.submodule else type(base).__name__
        self._install_lora(_lora_config(pattern, rank, alpha, dropout, exclude), where, adapters,
                           check=lambda layers: _refuse_frozen_targets(base, self.submodule, layers))

        self.objective = objective
        self.lr, self.weight_decay, self.betas, self.warmup_steps = lr, weight_decay, tuple(betas), warmup_steps
        self.lambda_lpips, self.lpips_resolution = lambda_lpips, lpips_resolution
        self.adapter_file, self.merge_at_inference = adapter_file, merge_at_inference
        self.lpips = None
        if objective == "render" and lambda_lpips > 0:
            from recon3d.metrics.lpips import LPIPSLoss

            # Refuses (names the files) when the pretrained LPIPS weights are absent.
            self.lpips = LPIPSLoss("vgg", pretrained=True, weights_dir=lpips_weights_dir, resize=lpips_resolution)
        # The reconstruction and everything derived from it are the base's (module docstring).
        self.refiners = base.refiners
        self.EXPORT_REPRESENTATION = type(base).EXPORT_REPRESENTATION

    # ------------------------------------------------------------------ adapters (LoRAStageMixin)
    @property
    def lora_owner(self) -> ReconModule:
        """The base method: every one of its weights is frozen; :meth:`merge_adapters` returns it."""
        return self.base

    @property
    def adapted(self) -> torch.nn.Module:
        """The part of the base that holds the adapters (``base.<submodule>``)."""
        return self.base.get_submodule(self.submodule) if self.submodule else self.base

    # ------------------------------------------------------------------ the base's reconstruction
    def reconstruct(self, batch: Batch) -> Reconstruction:
        """The base's reconstruction of ``batch``, with the adapters active."""
        return self.base.reconstruct(batch)

    def render_reconstruction(self, rec: Reconstruction, cameras: Cameras) -> RenderOutput:
        return self.base.render_reconstruction(rec, cameras)

    def reconstruction_meshes(self, rec: Reconstruction, batch: Batch) -> Meshes | None:
        return self.base.reconstruction_meshes(rec, batch)

    def reconstruction_geometry(self, rec: Reconstruction, batch: Batch) -> dict[str, torch.Tensor] | None:
        return self.base.reconstruction_geometry(rec, batch)

    def export_reconstruction(self, rec: Reconstruction, out_dir: Path, suffix: str = "", views: Views | None = None) -> dict[str, str]:
        return self.base.export_reconstruction(rec, out_dir, suffix=suffix, views=views)

    @property
    def empty_surface_reason(self) -> str:
        return self.base.empty_surface_reason

    @property
    def export_formats(self) -> tuple[str, ...] | None:
        """The base's export formats (``recon3d export --format`` sets them on the base)."""
        return self.base.export_formats

    @export_formats.setter
    def export_formats(self, value: tuple[str, ...] | None) -> None:
        self.base.export_formats = value

    # ------------------------------------------------------------------ training
    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Eq. 6 on ``(C^π = batch.inputs, C↑^π = batch.targets)``; ``objective`` says where it is
        computed (module docstring). Returns named scalars with the total under ``"loss"``."""
        self._check_trainable()
        if self.objective == "base":
            return self.base.training_losses(batch)
        return self._render_losses(batch)

    def _render_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        batch.require("targets.cameras", who="BoostModule (objective: render)")
        out = self.base.render_reconstruction(self.base.reconstruct(batch), batch.targets.cameras)
        pred, target = out["rgb"], batch.targets.images
        terms = {"rgb": F.mse_loss(pred, target)}
        loss = terms["rgb"]
        if self.lpips is not None:
            terms["lpips"] = self.lpips(pred.flatten(0, 1), target.flatten(0, 1))
            loss = loss + self.lambda_lpips * terms["lpips"]
        if torch.is_grad_enabled() and not loss.requires_grad:
            raise ConfigError(f"model.objective: 'render': {type(self.base).__name__}'s reconstruct/render_reconstruction "
                              "give the adapters no gradient; use objective: base (its training losses)")
        terms["psnr"] = -10 * torch.log10(terms["rgb"].detach().clamp_min(1e-10))
        terms["loss"] = loss
        return terms

    def train(self, mode: bool = True):
        """``nn.Module.train``, but the base's BatchNorm layers stay in eval mode: their running
        statistics are weights that boosting must not move."""
        super().train(mode)
        for m in self.base.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    # configure_optimizers, lr_factor, on_train_end, on_test_start / on_predict_start: LoRAStageMixin's


# ---------------------------------------------------------------------- helpers
def _load_base(base: ReconModule, path: str) -> None:
    """The base method's normal weight loading (strict, its own ignore patterns), before the
    adapters exist, so the checkpoint's keys are the method's own."""
    from recon3d.utils.checkpoint import load_weights_into

    if not Path(path).is_file():
        raise CheckpointError(f"model.base_checkpoint {path}: file not found (the trained {type(base).__name__} weights to boost)")
    load_weights_into(base, path, strict=True, ignore=getattr(base, "init_weights_ignore", None))
    log.info("loaded the base %s from %s", type(base).__name__, path)


def _load_official(base: ReconModule, path: str) -> None:
    """The released weights of the base method through its official importer (strict)."""
    entry = OFFICIAL_IMPORTERS.get(type(base).__name__)
    if entry is None:
        raise ConfigError(f"model.official_weights: no importer of released weights for {type(base).__name__} "
                          f"(there are for {sorted(OFFICIAL_IMPORTERS)}); give a recon3d checkpoint as model.base_checkpoint")
    if not Path(path).is_file():
        raise CheckpointError(f"model.official_weights {path}: file not found (the released {type(base).__name__} weights to boost)")
    submodule, importer = entry
    importer(path, base.get_submodule(submodule))
    log.info("loaded the released %s weights from %s", type(base).__name__, path)


def _resolve_targets(base: ReconModule, pattern, submodule: str | None) -> tuple[str, str | list[str]]:
    """``(submodule, pattern)``: the given ones, or the base class's default."""
    if pattern is None:
        default = getattr(type(base), "BOOST_TARGETS", None) or DEFAULT_TARGETS.get(type(base).__name__)
        if default is None:
            raise ConfigError(f"model.pattern: no default LoRA targets for {type(base).__name__} "
                              f"(defaults exist for {sorted(DEFAULT_TARGETS)}); give model.pattern (and model.submodule)")
        sub_default, pattern = default
        submodule = sub_default if submodule is None else submodule
    submodule = submodule or ""
    if submodule:
        try:
            base.get_submodule(submodule)
        except AttributeError:
            children = [n for n, _ in base.named_children()]
            raise ConfigError(f"model.submodule: {type(base).__name__} has no sub-module {submodule!r}; its children: {children}") from None
    return submodule, pattern


def _refuse_frozen_targets(base: ReconModule, submodule: str, layers: dict) -> None:
    """A frozen pretrained part (a DINOv2 encoder read from its own files) is left out of
    checkpoints and re-read from its source: adapters inside it would silently not be saved."""
    frozen = [n for n in base.frozen_pretrained() if n]
    for name in layers:
        full = f"{submodule}.{name}" if submodule else name
        part = next((f for f in frozen if full == f or full.startswith(f + ".")), None)
        if part is not None:
            raise ConfigError(f"model.pattern: {full} lies in {type(base).__name__}'s frozen pretrained part {part!r}, "
                              "which checkpoints leave out (its adapters would be lost); exclude it (model.exclude)")


def _lora_config(pattern, rank, alpha, dropout, exclude) -> LoRAConfig:
    try:
        return LoRAConfig(target_modules=pattern, r=rank, alpha=alpha, dropout=dropout, exclude=exclude)
    except ConfigError as e:  # LoRAConfig names its fields lora.<field>; name this module's options
        msg = str(e)
        for old, new in (("lora.target_modules", "model.pattern"), ("lora.r", "model.rank"), ("lora.alpha", "model.alpha"),
                         ("lora.dropout", "model.dropout"), ("lora.exclude", "model.exclude")):
            msg = msg.replace(old + ":", new + ":", 1)
        raise ConfigError(msg) from None
