"""ReconViaGen (paper ``shared/papers/003_*``, §4 / §5.4) in recon3d: VGGT-conditioned TRELLIS with a
Global Geometry Condition on the sparse-structure flow, Local Per-View Conditions on the SLAT
flow, rendering-aware velocity compensation (RVC) and camera estimation, trained and sampled.

This file wires the landed parts together and holds the Lightning side only:

- networks: :mod:`recon3d.models.trellis` (SS-VAE, SS flow, SLAT flow, SLAT encoder / decoders,
  DINOv2), :mod:`recon3d.models.vggt` (VGGT; its aggregator gives the per-layer tokens the
  condition nets read), :mod:`recon3d.models.reconviagen` (GGC / PVC nets, per-view
  cross-attention, RVC hook, rendering loss, pose start / refinement);
- frames, ground-truth surface voxels, SLAT features: :mod:`recon3d.methods.trellis` and
  :mod:`recon3d.methods.trellis_slat` (TRELLIS's ``[-0.5, 0.5]^3`` times 2 = recon3d's cube).

**Training stages** (each a config starting from the previous stage's weights; the VGGT LoRA
stage is :class:`recon3d.methods.vggt.VGGTModule`, whose adapter file ``vggt_adapters`` loads and
merges here):

- :class:`ReconViaGenSSFlowModule`: the SS flow conditioned by GGC over the frozen VGGT's tokens
  (``+ DINO`` with ``ggc.dino_channels > 0``, the official 3072-wide context), on the latents a
  frozen SS-VAE encoder gives the ground-truth surface voxels (as
  :class:`~recon3d.methods.trellis.TrellisSSFlowModule`).
- :class:`ReconViaGenSLatFlowModule`: the SLAT flow with per-view conditions
  (:func:`~recon3d.models.reconviagen.install_per_view_conditioning`: paper ``weighted`` or
  official ``mean``), on the latents of a frozen SLAT encoder over TRELLIS's per-voxel DINOv2
  features (:class:`~recon3d.methods.trellis_slat.TrellisSLatFlowModule`, whose latent and
  normalisation code it reuses).

Both train the condition net fully and the flow by ``flow_finetune``: ``"lora"`` (paper §5.4:
rank 64, alpha 128, dropout 0 on the attention's qkv mapping and output projector, i.e.
``to_qkv, to_q, to_kv, to_out`` — the official target list; official SLAT: r 128 / alpha 256),
``"full"`` (every flow weight) or ``"frozen"``. LoRA over a freshly initialised TRELLIS flow
trains nothing useful (its output layer starts at zero and stays frozen): the CPU configs use
``full``; LoRA is meant over TRELLIS's released weights (``flow_weights``). A stage checkpoint
with LoRA holds peft-wrapped keys; :func:`load_stage_weights` (``ss_stage`` / ``slat_stage`` of
:class:`ReconViaGenModule`) rebuilds the adapters from the checkpoint's record and **merges** them.

Objective (``objective``): ``"paper"`` — TRELLIS's rectified flow (logit-normal t per object)
with condition drop rate 0.3 per object (§5.4 gives the rate, not the unit); ``"official"`` — the
released trainers': one uniform t per batch, condition dropped for the whole batch with p 0.1,
their target (:meth:`~recon3d.models.flow.RectifiedFlowObjective.reconviagen`). ``p_uncond``
overrides the rate. ``random_views`` (official): each step uses a random number 1..V of the
batch's input views (one draw per batch; the paper: all given views). AdamW with a fixed LR
(§5.4). Not here (official-only, Trainer-level): fp16 AMP (``trainer.precision``), gradient
accumulation 4 / clip 0.5 (``trainer.accumulate_grad_batches`` / ``gradient_clip_val``), SWA
(Lightning's ``StochasticWeightAveraging`` callback).

**Sampling** (:class:`ReconViaGenModule`, ``recon3d predict/test/export``): the 1..N input views
(poses unknown) -> frozen VGGT (tokens + cameras) -> GGC -> SS flow (paper: 30 steps, CFG 7.5) ->
SS-VAE decode -> occupied voxels (empty -> one DataError naming the object) -> PVC -> SLAT flow
(12 steps, CFG 3.0), optionally with the RVC hook -> decoders -> Gaussians ``.ply`` + mesh ``.glb``.

- ``sampler_preset: paper`` (default): the paper's steps and CFG weights in TRELLIS's guidance
  convention ``(1 + w) v_c - w v_u`` (the paper does not state its convention; this reads it as
  TRELLIS's), TRELLIS's ``rescale_t`` 3 and guidance interval [0.5, 1] (the paper gives neither).
  ``official``: the demo's — SS 30 steps, w 7.5 in ReconViaGen's convention ``w v_c + (1 - w)
  v_u`` (= TRELLIS's 6.5), guidance rescale 0.7, rescale_t 5, interval [0.6, 1]; SLAT 12 steps,
  w 7.5, rescale 0.5, rescale_t 3, interval [0.6, 1]. ``ss_sampler`` / ``slat_sampler`` override
  single values (``cfg_convention`` included).
- Without ``pvc`` the SLAT flow takes DINOv2 tokens of every view with TRELLIS-M's mean velocity
  (the "GGC only" row of Table 2); without ``ggc`` the SS flow does the same (TRELLIS-M).
- **RVC** (``rvc``: a dict of :class:`~recon3d.models.reconviagen.VelocityCompensation` options,
  e.g. ``{mode: paper, alpha: 0.1}``; None = off) needs a differentiable Gaussian decoder. Its
  cameras (``rvc_cameras``): ``"nearest_render"`` (default, the official route: plain SLAT
  sampling first, its Gaussians rendered from ``n_renders`` orbit poses, VGGT run on renders +
  inputs, each input gets its nearest render's known pose — or ``camera_mapping: align``: VGGT's
  input cameras moved by the similarity fitted on the renders — optionally refined by
  :class:`~recon3d.models.reconviagen.PoseRefiner` with ``pose_refine``), then the SLAT flow is
  sampled again from the same noise with the hook; ``"inputs"``: the batch's own input cameras
  (posed data / oracle; tests). The images must stand on the renderer's background
  (``rvc_background``, white as recon3d's views). ``extras["rvc"]`` holds the hook's record and
  the per-view loss of the final sample (and, with ``rvc_reference`` or the nearest-render route,
  that of the plain sample from the same noise).
- ``Reconstruction.cameras``: the predicted input cameras — the RVC cameras when estimated in
  the object frame, else VGGT's, mapped into the dataset's world by the camera-0 + scale
  similarity when the batch has input cameras (as :class:`~recon3d.methods.vggt.VGGTModule`; pose
  metrics are invariant to it), so ``recon3d test`` reports RRE / TE / Acc.

**Inputs.** One view works (GGC and PVC over one view; the SS/SLAT samplers run single-image).
Views without masks: masks are derived from the background colour (pixels within ``mask_tol``
of ``batch.background``; an object with no foreground pixel is one DataError naming it).
Views of different sizes cannot share a batch tensor (the data layer refuses them); VGGT
resizes sides that are not multiples of 14 (``VGGTNetwork(resize=True)``) or refuses them
with one line. The ReconViaGen module trains its SS flow + GGC (as TrellisModule trains its SS
flow); the SLAT flow has its stage.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
import torch.nn as nn

from recon3d.data.batch import Batch
from recon3d.data.cameras import Cameras
from recon3d.errors import CheckpointError, ConfigError, DataError, ShapeError
from recon3d.methods.base import NonFiniteGuard, own_instance
from recon3d.methods.trellis import (
    TrellisModule,
    _run_decoder,
    _TrellisBase,
    ss_flow_targets,
    trellis_voxels_to_world,
)
from recon3d.methods.trellis import _sampler_params as _trellis_sampler_params
from recon3d.models.flow import FlowEulerSampler, RectifiedFlowObjective
from recon3d.models.reconviagen.conditions import GlobalGeometryCondition, LinearPerViewCondition, PerViewCondition
from recon3d.models.reconviagen.multiview_cross_attention import install_per_view_conditioning
from recon3d.models.trellis.conditioning import TrellisImageCondition
from recon3d.models.trellis.slat_decoders import SLatGaussianDecoder, SLatMeshDecoder
from recon3d.models.trellis.slat_flow import SLatFlowModel
from recon3d.models.trellis.ss_flow import SparseStructureFlowModel
from recon3d.models.trellis.ss_vae import SparseStructureDecoder, SparseStructureEncoder
from recon3d.models.vggt import VGGTNetwork
from recon3d.representations import Gaussians, SparseVoxels
from recon3d.representations.reconstruction import Reconstruction
from recon3d.utils.checks import check_option

__all__ = ["ReconViaGenSSFlowModule", "ReconViaGenSLatFlowModule", "ReconViaGenModule", "SAMPLER_PRESETS", "FLOW_LORA_TARGETS",
           "derive_masks", "apply_flow_finetune", "load_stage_weights"]

log = logging.getLogger(__name__)

#: The attention projections LoRA wraps in the flows (official list; paper: "qkv mapping and output projector").
FLOW_LORA_TARGETS = ["to_q", "to_kv", "to_out", "to_qkv"]
FINETUNE = ("lora", "full", "frozen")
OBJECTIVES = ("paper", "official")
_SAMPLER_KEYS = ("steps", "cfg_strength", "cfg_interval", "rescale_t", "sigma_min", "guidance_rescale", "cfg_convention")

#: (SS sampler, SLAT sampler) per preset (module docstring).
SAMPLER_PRESETS = {
    "paper": ({"steps": 30, "cfg_strength": 7.5, "cfg_convention": "trellis", "cfg_interval": (0.5, 1.0), "rescale_t": 3.0},
              {"steps": 12, "cfg_strength": 3.0, "cfg_convention": "trellis", "cfg_interval": (0.5, 1.0), "rescale_t": 3.0}),
    "official": ({"steps": 30, "cfg_strength": 7.5, "cfg_convention": "reconviagen", "cfg_interval": (0.6, 1.0), "rescale_t": 5.0,
                  "guidance_rescale": 0.7},
                 {"steps": 12, "cfg_strength": 7.5, "cfg_convention": "reconviagen", "cfg_interval": (0.6, 1.0), "rescale_t": 3.0,
                  "guidance_rescale": 0.5}),
}


# ---------------------------------------------------------------------------------- helpers
def derive_masks(images: torch.Tensor, background: torch.Tensor | None, tol: float = 0.02) -> torch.Tensor:
    """Foreground masks ``(B, V, 1, H, W)`` of views ``(B, V, 3, H, W)`` composited on ``background``
    ``(B, 3)`` (None: white): a pixel is foreground when any channel differs from the background by
    more than ``tol``."""
    B = images.shape[0]
    bg = torch.ones(B, 3) if background is None else torch.as_tensor(background, dtype=torch.float32).reshape(-1, 3).expand(B, 3)
    bg = bg.to(images)[:, None, :, None, None]
    return ((images - bg).abs().amax(2, keepdim=True) > tol).to(images.dtype)


def _sampler_params(base: dict, override: dict | None, what: str) -> dict:
    """TrellisModule's sampler-param check with ReconViaGen's keys (``cfg_convention`` too)."""
    return _trellis_sampler_params(base, override, what, keys=_SAMPLER_KEYS)


def apply_flow_finetune(flow: nn.Module, mode: str, rank: int, alpha: float, targets: list[str] | str, what: str) -> dict | None:
    """Set what of ``flow`` trains: ``"full"`` (all), ``"frozen"`` (nothing), ``"lora"`` (LoRA
    adapters on ``targets``, base frozen). Returns the LoRA record (``r``, ``alpha``, ``targets``)
    a checkpoint keeps so that :func:`load_stage_weights` can rebuild and merge it, or None."""
    if mode not in FINETUNE:
        raise ConfigError(f"{what}: expected one of {list(FINETUNE)}, got {mode!r}")
    if mode == "full":
        flow.requires_grad_(True)
        return None
    flow.requires_grad_(False)
    if mode == "frozen":
        return None
    from recon3d.adapters import LoRAConfig, add_lora, mark_only_lora_as_trainable

    cfg = LoRAConfig(target_modules=targets, r=int(rank), alpha=float(alpha), dropout=0.0)
    add_lora(flow, cfg)
    mark_only_lora_as_trainable(flow)
    return {"r": int(rank), "alpha": float(alpha), "targets": list(targets) if not isinstance(targets, str) else targets}


def load_stage_weights(parts: dict[str, nn.Module], path: str, lora: dict | None = None) -> list[str]:
    """Load a stage checkpoint's tensors into ``parts`` (``{checkpoint prefix: module}``, e.g.
    ``{"flow.": ss_flow, "ggc.": ggc}``), strictly per part. A part whose keys are LoRA-wrapped
    (the stage trained it with ``flow_finetune: lora``) gets the same adapters first — from the
    checkpoint's ``reconviagen_lora`` record (or ``lora``) — then loads and **merges** them
    (plain weights after). Returns the prefixes loaded."""
    from recon3d.adapters import LoRAConfig, add_lora, merge_lora
    from recon3d.utils.checkpoint import extract_state_dict, load_state_dict_file

    ckpt = load_state_dict_file(path)
    records = ckpt.get("reconviagen_lora", {}) if isinstance(ckpt, dict) else {}
    done = []
    for prefix, module in parts.items():
        if module is None:
            continue
        try:
            sd = extract_state_dict(ckpt, prefix)
        except CheckpointError:
            raise CheckpointError(f"{path}: no tensors under {prefix!r} (expected a ReconViaGen stage checkpoint holding {prefix.rstrip('.')})") from None
        wrapped = any(".lora_A." in k for k in sd)
        if wrapped:
            rec = records.get(prefix.rstrip(".")) or lora
            if rec is None:
                raise CheckpointError(f"{path}: {prefix!r} has LoRA keys but no 'reconviagen_lora' record of r / alpha / targets")
            add_lora(module, LoRAConfig(target_modules=rec["targets"], r=int(rec["r"]), alpha=float(rec["alpha"])))
        missing, unexpected = module.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{path}: {prefix!r} does not match {type(module).__name__}: missing {list(missing)[:3]}, "
                                  f"unexpected {list(unexpected)[:3]}")
        if wrapped:
            merge_lora(module, unload=True)
        done.append(prefix)
    return done


def _objective(kind: str, p_uncond: float | None, sigma_min: float) -> RectifiedFlowObjective:
    if kind not in OBJECTIVES:
        raise ConfigError(f"model.objective: expected one of {list(OBJECTIVES)}, got {kind!r}")
    if kind == "paper":
        return RectifiedFlowObjective.trellis(sigma_min=sigma_min, p_uncond=0.3 if p_uncond is None else p_uncond)
    return RectifiedFlowObjective.reconviagen(sigma_min=sigma_min, p_uncond=0.1 if p_uncond is None else p_uncond)


# ---------------------------------------------------------------------------------- shared parts
class _ReconViaGenBase(_TrellisBase):
    """VGGT (frozen) features of the input views, their DINOv2 tokens, masks and the conditions."""

    def _init_vggt(self, vggt: VGGTNetwork, vggt_weights: str | None, vggt_adapters: str | None, mask_tol: float) -> None:
        net = own_instance(vggt)
        if not isinstance(net, VGGTNetwork):
            raise ConfigError(f"model.vggt: expected a recon3d.models.vggt.VGGTNetwork, got {type(net).__name__}")
        check_option("model.mask_tol", mask_tol, 0.0)
        if vggt_weights is not None:
            from recon3d.models.vggt.pretrained import load_official_vggt

            load_official_vggt(vggt_weights, net)
        if vggt_adapters is not None:  # the VGGT LoRA stage's adapter file, merged for inference
            from recon3d.adapters import add_lora, load_lora, merge_lora, read_lora_config

            add_lora(net, read_lora_config(vggt_adapters))
            load_lora(net, vggt_adapters)
            merge_lora(net, unload=True)
        net.requires_grad_(False)
        net.eval()
        self.vggt, self.mask_tol = net, float(mask_tol)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vggt.eval()  # frozen (paper §4.2.2: VGGT fixed while the generator trains)
        return self

    # -------------------------------------------------------------- inputs
    def input_masks(self, batch: Batch) -> torch.Tensor:
        """``(B, V, 1, H, W)``: the views' masks, or derived from the background (module docstring)."""
        inp = batch.inputs
        if inp.masks is not None:
            return inp.masks
        masks = derive_masks(inp.images, batch.background, self.mask_tol)
        empty = [oid for b, oid in enumerate(batch.object_ids) if not bool(masks[b].any())]
        if empty:
            raise DataError(empty[0], f"inputs.masks: none given and no pixel differs from the background by more than "
                            f"model.mask_tol={self.mask_tol:g}; give masks or images of the object on a plain background")
        return masks

    @torch.no_grad()
    def vggt_outputs(self, images: torch.Tensor) -> dict:
        """The frozen VGGT on ``images (B, S, 3, H, W)``: ``tokens`` (per-layer ``[B, S, P, 2C]``),
        ``patch_start_idx`` and ``cameras`` (:class:`Cameras` ``(B, S)`` at the given size, VGGT's
        frame: camera 0 = identity)."""
        from recon3d.models.vggt.cameras import pose_encoding_to_cameras

        p = self.vggt.cfg.patch_size
        H, W = images.shape[-2:]
        if not self.vggt.resize and (H % p or W % p):
            raise ShapeError(f"inputs.images: VGGT takes sides that are multiples of {p}, got {H}x{W}; set data.input_resolution to "
                             f"one (e.g. {max(p, round(W / p) * p)}) or build model.vggt with resize: true")
        out = self.vggt(images.float())
        if "pose_enc" in out:
            enc = out["pose_enc"].float()
            # an untrained head may give FoV 0 after its ReLU: clamp so that the intrinsics exist
            enc = torch.cat([enc[..., :7], enc[..., 7:].clamp(1e-3, math.pi - 1e-3)], -1)
            out["cameras"] = pose_encoding_to_cameras(enc, int(H), int(W))
        return out

    def dino_tokens(self, batch: Batch, views: list[int], masks: torch.Tensor) -> torch.Tensor:
        """DINOv2 condition tokens ``(B, S, P, C)`` of the input views ``views``."""
        if self.condition is None:
            raise ConfigError(f"model.condition: {type(self).__name__} needs DINOv2 tokens here (a DINO-concatenating GGC, the "
                              "official per-view condition or TRELLIS-M conditioning); give model.condition")
        return torch.stack([self.condition(batch.inputs.images[:, v], masks[:, v], batch.background) for v in views], 1)

    def global_condition(self, ggc: GlobalGeometryCondition, batch: Batch, views: list[int], masks: torch.Tensor,
                         vout: dict | None = None) -> torch.Tensor:
        """GGC tokens ``(B, T, C)`` over the views ``views``."""
        vout = vout if vout is not None else self.vggt_outputs(batch.inputs.images[:, views])
        dino = self.dino_tokens(batch, views, masks) if ggc.dino_channels > 0 else None
        return ggc(vout["tokens"], dino, patch_start_idx=vout["patch_start_idx"])

    def view_condition(self, pvc: nn.Module, batch: Batch, views: list[int], masks: torch.Tensor,
                       vout: dict | None = None) -> torch.Tensor:
        """Per-view tokens ``(B, S, T, C)`` over the views ``views`` (paper or official PVC)."""
        vout = vout if vout is not None else self.vggt_outputs(batch.inputs.images[:, views])
        if isinstance(pvc, LinearPerViewCondition):
            return pvc(vout["tokens"], self.dino_tokens(batch, views, masks))
        dino = self.dino_tokens(batch, views, masks) if pvc.dino_channels > 0 else None
        return pvc(vout["tokens"], dino, patch_start_idx=vout["patch_start_idx"])

    def train_views(self, batch: Batch, generators: list[torch.Generator]) -> list[int]:
        """The input views a training step uses: all, or (``random_views``) a random 1..V of them
        (one draw per batch, from the first object's generator: the official ``n_use``)."""
        V = batch.inputs.images.shape[1]
        if not self.random_views or V == 1:
            return list(range(V))
        g = generators[0]
        n = int(torch.randint(1, V + 1, (1,), generator=g))
        return sorted(torch.randperm(V, generator=g)[:n].tolist())

    def _init_finetune(self, flow_finetune: str, lora_rank: int, lora_alpha: float, lora_targets, random_views: bool) -> None:
        check_option("model.lora_rank", lora_rank, 1, integer=True)
        check_option("model.lora_alpha", lora_alpha, 0.0, strict=True)
        self.random_views = bool(random_views)
        self.lora_records: dict[str, dict] = {}
        self.flow_finetune = flow_finetune
        self._lora_args = (lora_rank, lora_alpha, lora_targets)

    def _finetune(self, name: str, flow: nn.Module) -> None:
        rec = apply_flow_finetune(flow, self.flow_finetune, *self._lora_args, what="model.flow_finetune")
        if rec is not None:
            self.lora_records[name] = rec

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.lora_records:  # plain data: what load_stage_weights needs to rebuild and merge the adapters
            checkpoint["reconviagen_lora"] = {k: dict(v) for k, v in self.lora_records.items()}

    def _train_params(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith(("vggt.", "condition."))]


def _load_flow_weights(flow: nn.Module, path: str | None, what: str) -> None:
    """A pretrained TRELLIS flow (``.safetensors`` of upstream's keys, or a ``.ckpt``) before LoRA / PVC."""
    if path is None:
        return
    from recon3d.utils.checkpoint import load_weights_into

    load_weights_into(flow, path, strict=True)
    log.info("%s: loaded %s", what, path)


def ggc_ss_flow_losses(module: _ReconViaGenBase, flow: SparseStructureFlowModel, encoder: SparseStructureEncoder,
                       ggc: GlobalGeometryCondition, objective: RectifiedFlowObjective, batch: Batch) -> dict[str, torch.Tensor]:
    """One batch of the SS-flow stage: ``x0`` = SS-VAE encoder mean of the ground-truth surface
    voxels, condition = GGC over the (chosen) input views' VGGT tokens; the condition net gets
    gradients, VGGT does not."""
    x0, gens = ss_flow_targets(module, flow, encoder, batch)
    views = module.train_views(batch, gens)
    masks = module.input_masks(batch)
    cond = module.global_condition(ggc, batch, views, masks)
    out = objective.loss(flow, x0, cond, generator=gens)
    return {"loss": out.loss, "ss_flow_mse": out.loss.detach(), "views": torch.tensor(float(len(views)))}


# ---------------------------------------------------------------------------------- SS-flow stage
class ReconViaGenSSFlowModule(_ReconViaGenBase):
    """ReconViaGen's SS-flow stage: TRELLIS's SS flow conditioned by GGC (module docstring).

    Args:
        flow: the :class:`SparseStructureFlowModel` (``cond_channels`` = GGC's ``channels``).
        ggc: the :class:`GlobalGeometryCondition` (trained fully).
        vggt: the frozen :class:`VGGTNetwork`; vggt_weights: released weights; vggt_adapters: the
            VGGT LoRA stage's adapter file (added and merged).
        ss_encoder: SS-VAE encoder giving ``x0`` (frozen); ss_encoder_weights / _prefix as TrellisSSFlowModule.
        condition: DINOv2 (frozen), needed only when ``ggc.dino_channels > 0`` (official).
        flow_weights: TRELLIS's released SS flow to start from (before LoRA).
        flow_finetune: ``lora`` (paper, default) / ``full`` / ``frozen``; lora_rank, lora_alpha,
            lora_targets: 64, 128, :data:`FLOW_LORA_TARGETS`.
        objective: ``paper`` (drop 0.3 per object, logit-normal t) / ``official`` (0.1 per batch,
            one uniform t per batch); p_uncond overrides the drop rate.
        random_views: official 1..V random input views per step.
        lr, weight_decay, betas: AdamW, fixed LR (paper; official 1e-4).
        mask_tol: background tolerance of derived masks. up_axis, voxel_spacing: as TRELLIS's stages.
    """

    RECONSTRUCTS_3D = False  # a latent generator stage; ReconViaGenModule samples and decodes

    def __init__(self, flow: SparseStructureFlowModel, ggc: GlobalGeometryCondition, vggt: VGGTNetwork,
                 ss_encoder: SparseStructureEncoder, condition: TrellisImageCondition | None = None,
                 vggt_weights: str | None = None, vggt_adapters: str | None = None, ss_encoder_weights: str | None = None,
                 ss_encoder_prefix: str = "encoder.", flow_weights: str | None = None,
                 flow_finetune: Literal["lora", "full", "frozen"] = "lora", lora_rank: int = 64, lora_alpha: float = 128.0,
                 lora_targets: list[str] | str = FLOW_LORA_TARGETS, objective: Literal["paper", "official"] = "paper",
                 p_uncond: float | None = None, sigma_min: float = 1e-5, random_views: bool = False, lr: float = 1e-4,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), mask_tol: float = 0.02,
                 up_axis: Literal["z", "y"] = "z", voxel_spacing: float = 0.25, evaluation=None, init_weights: str | None = None,
                 nonfinite: NonFiniteGuard | None = None, vis_views: int = 4, init_weights_ignore: list[str] | None = None,
                 validation_mode: Literal["render", "loss"] = "loss", eval_seed: int = 0):
        super().__init__(evaluation=evaluation, init_weights=init_weights, nonfinite=nonfinite, vis_views=vis_views,
                         init_weights_ignore=init_weights_ignore, validation_mode=validation_mode, eval_seed=eval_seed)
        self.save_hyperparameters()
        self._init_common(up_axis, lr, weight_decay, betas, voxel_spacing)
        self.flow, self.ggc, self.ss_encoder = own_instance(flow), own_instance(ggc), own_instance(ss_encoder)
        self.condition = own_instance(condition)
        if self.condition is not None:
            self.condition.requires_grad_(False)
        self._init_vggt(vggt, vggt_weights, vggt_adapters, mask_tol)
        _check_ss_parts(self.flow, self.ggc, self.ss_encoder, self.vggt, self.condition)
        from recon3d.methods.trellis import _load_frozen_encoder

        _load_frozen_encoder(self.ss_encoder, ss_encoder_weights, ss_encoder_prefix)
        _load_flow_weights(self.flow, flow_weights, "model.flow_weights")
        self._init_finetune(flow_finetune, lora_rank, lora_alpha, lora_targets, random_views)
        self._finetune("flow", self.flow)
        self.objective = _objective(objective, p_uncond, sigma_min)

    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        return ggc_ss_flow_losses(self, self.flow, self.ss_encoder, self.ggc, self.objective, batch)

    def reconstruct(self, batch: Batch) -> Reconstruction:
        raise ConfigError("ReconViaGenSSFlowModule is a training stage: sample with recon3d.methods.reconviagen.ReconViaGenModule "
                          "(configs/reconviagen_cpu.yaml, model.ss_stage: this stage's checkpoint)")


def _check_ss_parts(flow, ggc, encoder, vggt, condition) -> None:
    if not isinstance(ggc, GlobalGeometryCondition):
        raise ConfigError(f"model.ggc: expected a GlobalGeometryCondition, got {type(ggc).__name__}")
    if ggc.channels != flow.cond_channels:
        raise ConfigError(f"model.ggc: channels {ggc.channels} differs from the SS flow's cond_channels {flow.cond_channels}")
    _check_vggt_width(ggc, vggt, "model.ggc")
    if encoder is not None and encoder.latent_channels != flow.in_channels:
        raise ConfigError(f"model.ss_encoder: latent_channels {encoder.latent_channels} differs from the flow's in_channels {flow.in_channels}")
    if ggc.dino_channels and (condition is None or condition.out_dim != ggc.dino_channels):
        got = "none" if condition is None else condition.out_dim
        raise ConfigError(f"model.condition: the GGC concatenates {ggc.dino_channels}-wide DINOv2 tokens; DINOv2 width is {got}")


def _check_vggt_width(net, vggt: VGGTNetwork, what: str) -> None:
    width = 2 * vggt.cfg.embed_dim
    if net.vggt_channels != width:
        raise ConfigError(f"{what}: vggt_channels {net.vggt_channels} differs from the VGGT's token width {width} (2 x embed_dim)")
    depth = vggt.cfg.depth
    if max(net.layers) >= depth:
        raise ConfigError(f"{what}: layers {list(net.layers)} read past the VGGT's {depth} aggregator layers")


# ---------------------------------------------------------------------------------- SLAT-flow stage
def _slat_stage_base():
    from recon3d.methods.trellis_slat import TrellisSLatFlowModule

    return TrellisSLatFlowModule


class ReconViaGenSLatFlowModule(_slat_stage_base(), _ReconViaGenBase):
    """ReconViaGen's SLAT-flow stage: TRELLIS's SLAT flow with per-view conditions (module docstring).

    Args (besides :class:`~recon3d.methods.trellis_slat.TrellisSLatFlowModule`'s ``flow``,
    ``slat_encoder``, ``condition`` (DINOv2: the voxel features, and the official PVC's tokens),
    normalisation and feature options):
        pvc: :class:`PerViewCondition` (paper) or :class:`LinearPerViewCondition` (official),
            trained fully; its ``channels`` = the flow's ``cond_channels``.
        vggt, vggt_weights, vggt_adapters: the frozen VGGT.
        per_view_mode: ``weighted`` (paper: learned per-view weights in [0, 1]) / ``mean`` (official).
        flow_weights, flow_finetune, lora_rank, lora_alpha, lora_targets: as the SS stage
            (official SLAT LoRA: r 128, alpha 256).
        objective, p_uncond, random_views, mask_tol: as the SS stage.
    """

    def __init__(self, flow: SLatFlowModel, slat_encoder, condition: TrellisImageCondition, pvc: nn.Module, vggt: VGGTNetwork,
                 vggt_weights: str | None = None, vggt_adapters: str | None = None,
                 per_view_mode: Literal["weighted", "mean"] = "weighted", flow_weights: str | None = None,
                 flow_finetune: Literal["lora", "full", "frozen"] = "lora", lora_rank: int = 64, lora_alpha: float = 128.0,
                 lora_targets: list[str] | str = FLOW_LORA_TARGETS, objective: Literal["paper", "official"] = "paper",
                 p_uncond: float | None = None, random_views: bool = False, mask_tol: float = 0.02,
                 slat_encoder_weights: str | None = None, slat_encoder_prefix: str = "encoder.",
                 slat_mean: list[float] | None = None, slat_std: list[float] | None = None, pipeline: str | None = None,
                 normalization_batches: int = 16, feature_views: Literal["inputs", "targets", "all"] = "all",
                 cache_features: bool = True, feature_chunk: int = 16, sigma_min: float = 1e-5, lr: float = 1e-4,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), up_axis: Literal["z", "y"] = "z",
                 voxel_spacing: float = 0.25, evaluation=None, init_weights: str | None = None,
                 nonfinite: NonFiniteGuard | None = None, vis_views: int = 4, init_weights_ignore: list[str] | None = None,
                 validation_mode: Literal["render", "loss"] = "loss", eval_seed: int = 0):
        pvc = own_instance(pvc)
        if not isinstance(pvc, (PerViewCondition, LinearPerViewCondition)):
            raise ConfigError(f"model.pvc: expected a PerViewCondition or LinearPerViewCondition, got {type(pvc).__name__}")
        flow = own_instance(flow)
        if pvc.channels != flow.cond_channels:
            raise ConfigError(f"model.pvc: channels {pvc.channels} differs from the SLAT flow's cond_channels {flow.cond_channels}")
        _load_flow_weights(flow, flow_weights, "model.flow_weights")
        super().__init__(flow, slat_encoder, condition, slat_encoder_weights=slat_encoder_weights,
                         slat_encoder_prefix=slat_encoder_prefix, slat_mean=slat_mean, slat_std=slat_std, pipeline=pipeline,
                         normalization_batches=normalization_batches, feature_views=feature_views,
                         cache_features=cache_features, feature_chunk=feature_chunk, sigma_min=sigma_min, lr=lr,
                         weight_decay=weight_decay, betas=betas, up_axis=up_axis, voxel_spacing=voxel_spacing,
                         evaluation=evaluation, init_weights=init_weights, nonfinite=nonfinite, vis_views=vis_views,
                         init_weights_ignore=init_weights_ignore, validation_mode=validation_mode, eval_seed=eval_seed)
        self.save_hyperparameters()
        self.pvc = pvc
        self._init_vggt(vggt, vggt_weights, vggt_adapters, mask_tol)
        _check_vggt_width(pvc, self.vggt, "model.pvc")
        install_per_view_conditioning(self.flow, per_view_mode)
        self.per_view_mode = per_view_mode
        self._init_finetune(flow_finetune, lora_rank, lora_alpha, lora_targets, random_views)
        self._finetune("flow", self.flow)
        if self.flow_finetune == "lora":  # the paper's per-view weight MLPs are new: they train fully
            for n, p in self.flow.named_parameters():
                if ".view_weight." in n:
                    p.requires_grad_(True)
        self.objective = _objective(objective, p_uncond, sigma_min)

    def _train_params(self) -> list[nn.Parameter]:
        return _ReconViaGenBase._train_params(self)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vggt.eval()
        self.slat_encoder.eval()
        return self

    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        x0 = self.normalized_latents(batch)
        gens = self.step_generators(batch)
        views = self.train_views(batch, gens)
        cond = self.view_condition(self.pvc, batch, views, self.input_masks(batch))
        out = self.objective.loss(self.flow, x0, cond, generator=gens)
        return {"loss": out.loss, "slat_flow_mse": out.loss.detach(), "views": torch.tensor(float(len(views)))}

    def reconstruct(self, batch: Batch) -> Reconstruction:
        raise ConfigError("ReconViaGenSLatFlowModule is a training stage: sample with recon3d.methods.reconviagen.ReconViaGenModule "
                          "(model.slat_stage: this stage's checkpoint)")


# ---------------------------------------------------------------------------------- image(s)-to-3D
class ReconViaGenModule(_ReconViaGenBase):
    """ReconViaGen image(s)-to-3D (module docstring).

    Args:
        vggt: the frozen :class:`VGGTNetwork` (camera head needed for the predicted cameras);
            vggt_weights, vggt_adapters as the stages.
        ss_flow, ss_decoder: TRELLIS's SS flow and SS-VAE decoder; ss_encoder only to train.
        slat_flow: TRELLIS's SLAT flow (its ``resolution`` = the decoded structure's).
        ggc: GGC of the SS flow; None: TRELLIS-M with DINOv2 tokens of each view (``condition``).
        pvc: paper / official per-view condition of the SLAT flow (installed with
            ``per_view_mode``); None: TRELLIS-M with DINOv2 tokens (the "GGC only" ablation row).
        condition: DINOv2 (:class:`TrellisImageCondition`), where a part needs it.
        gaussian_decoder: :class:`SLatGaussianDecoder` (or any ``slat -> Gaussians`` in TRELLIS's
            frame); None: one Gaussian per structure voxel (no RVC then).
        mesh_decoder: :class:`SLatMeshDecoder` (or ``slat -> Meshes``); None: marching cubes of the
            SS decoder's logits.
        ss_stage, slat_stage: stage checkpoints (:class:`ReconViaGenSSFlowModule` keys ``flow.``,
            ``ggc.``; :class:`ReconViaGenSLatFlowModule` ``flow.``, ``pvc.``, ``slat_mean/std``),
            LoRA merged (:func:`load_stage_weights`).
        sampler_preset: ``paper`` / ``official``; ss_sampler, slat_sampler: overrides.
        slat_mean, slat_std: SLAT normalisation (None: the slat stage's, else 0 / 1); given values must
            match the slat stage's (a stage checkpoint without them needs them given).
        rvc: :class:`~recon3d.models.reconviagen.VelocityCompensation` options, None = off.
        rvc_cameras: ``nearest_render`` / ``inputs``; camera_mapping: ``nearest`` / ``align``;
            n_renders: orbit renders (official 20); render_radius, render_fov: their orbit;
            pose_refine: :class:`~recon3d.models.reconviagen.PoseRefiner` options (None = no refinement);
            rvc_background: renderer background of RVC (the views' colour).
            rvc_reference: with ``rvc_cameras: inputs``, also sample without RVC from the same noise and
                record its input-view loss (``extras["rvc"]["view_loss_without_rvc"]``); the nearest-render
                route samples it anyway (the object the cameras are found on).
        max_views: use the first this many input views (None: all).
        mask_tol: background tolerance of derived masks.
        objective, p_uncond, sigma_min, lr, weight_decay, betas, random_views: the SS-flow + GGC
            training this module does (the SS stage's; the flow trains fully here).
        render_backend, export_min_opacity, up_axis, voxel_spacing: as TrellisModule.
    """

    RUNTIME_OPTIONS = _TrellisBase.RUNTIME_OPTIONS | {"sampler_preset", "ss_sampler", "slat_sampler", "rvc", "rvc_cameras",
                                                      "camera_mapping", "n_renders", "pose_refine", "max_views", "rvc_reference",
                                                      "render_backend", "export_min_opacity"}
    EXPORT_REPRESENTATION = Gaussians

    def __init__(self, vggt: VGGTNetwork, ss_flow: SparseStructureFlowModel, ss_decoder: SparseStructureDecoder,
                 slat_flow: SLatFlowModel, ggc: GlobalGeometryCondition | None = None, pvc: nn.Module | None = None,
                 condition: TrellisImageCondition | None = None, gaussian_decoder: nn.Module | None = None,
                 mesh_decoder: nn.Module | None = None, ss_encoder: SparseStructureEncoder | None = None,
                 per_view_mode: Literal["weighted", "mean"] = "weighted", vggt_weights: str | None = None,
                 vggt_adapters: str | None = None, ss_stage: str | None = None, slat_stage: str | None = None,
                 ss_encoder_weights: str | None = None, ss_encoder_prefix: str = "encoder.",
                 sampler_preset: Literal["paper", "official"] = "paper", ss_sampler: dict | None = None,
                 slat_sampler: dict | None = None, slat_mean: list[float] | None = None, slat_std: list[float] | None = None,
                 rvc: dict | None = None, rvc_cameras: Literal["nearest_render", "inputs"] = "nearest_render",
                 camera_mapping: Literal["nearest", "align"] = "nearest", n_renders: int = 20, render_radius: float = 2.5,
                 render_fov: float = 40.0, pose_refine: dict | None = None, rvc_background: str = "white",
                 rvc_reference: bool = False,
                 max_views: int | None = None, mask_tol: float = 0.02, objective: Literal["paper", "official"] = "paper",
                 p_uncond: float | None = None, sigma_min: float = 1e-5, random_views: bool = False, lr: float = 1e-4,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), render_backend: str = "auto",
                 export_min_opacity: float = 0.0, up_axis: Literal["z", "y"] = "z", voxel_spacing: float = 0.25,
                 evaluation=None, init_weights: str | None = None, nonfinite: NonFiniteGuard | None = None, vis_views: int = 4,
                 init_weights_ignore: list[str] | None = None, validation_mode: Literal["render", "loss"] = "render",
                 eval_seed: int = 0):
        super().__init__(evaluation=evaluation, init_weights=init_weights, nonfinite=nonfinite, vis_views=vis_views,
                         init_weights_ignore=init_weights_ignore, validation_mode=validation_mode, eval_seed=eval_seed)
        self.save_hyperparameters()
        self._init_common(up_axis, lr, weight_decay, betas, voxel_spacing)
        if sampler_preset not in SAMPLER_PRESETS:
            raise ConfigError(f"model.sampler_preset: expected one of {list(SAMPLER_PRESETS)}, got {sampler_preset!r}")
        if rvc_cameras not in ("nearest_render", "inputs"):
            raise ConfigError(f"model.rvc_cameras: expected 'nearest_render' or 'inputs', got {rvc_cameras!r}")
        if camera_mapping not in ("nearest", "align"):
            raise ConfigError(f"model.camera_mapping: expected 'nearest' or 'align', got {camera_mapping!r}")
        check_option("model.n_renders", n_renders, 1, integer=True)
        check_option("model.max_views", max_views, 1, integer=True, allow_none=True)
        check_option("model.export_min_opacity", export_min_opacity, 0.0)
        self._init_vggt(vggt, vggt_weights, vggt_adapters, mask_tol)
        self.ss_flow, self.ss_decoder, self.slat_flow = own_instance(ss_flow), own_instance(ss_decoder), own_instance(slat_flow)
        self.ggc, self.pvc, self.condition = own_instance(ggc), own_instance(pvc), own_instance(condition)
        self.gaussian_decoder, self.mesh_decoder = own_instance(gaussian_decoder), own_instance(mesh_decoder)
        self.ss_encoder = own_instance(ss_encoder)
        if self.condition is not None:
            self.condition.requires_grad_(False)
        if self.ggc is not None:
            _check_ss_parts(self.ss_flow, self.ggc, self.ss_encoder, self.vggt, self.condition)
        elif self.condition is None or self.condition.out_dim != self.ss_flow.cond_channels:
            raise ConfigError("model.ggc: without a GGC the SS flow takes DINOv2 tokens (TRELLIS-M); give model.condition of width "
                              f"{self.ss_flow.cond_channels} (the SS flow's cond_channels)")
        if self.pvc is not None:
            if not isinstance(self.pvc, (PerViewCondition, LinearPerViewCondition)):
                raise ConfigError(f"model.pvc: expected a PerViewCondition or LinearPerViewCondition, got {type(self.pvc).__name__}")
            if self.pvc.channels != self.slat_flow.cond_channels:
                raise ConfigError(f"model.pvc: channels {self.pvc.channels} differs from the SLAT flow's cond_channels {self.slat_flow.cond_channels}")
            _check_vggt_width(self.pvc, self.vggt, "model.pvc")
            if isinstance(self.pvc, LinearPerViewCondition) and self.condition is None:
                raise ConfigError("model.condition: the official LinearPerViewCondition refines DINOv2 tokens; give model.condition")
            install_per_view_conditioning(self.slat_flow, per_view_mode)
        elif self.condition is None or self.condition.out_dim != self.slat_flow.cond_channels:
            raise ConfigError("model.pvc: without a PVC the SLAT flow takes DINOv2 tokens (TRELLIS-M); give model.condition of width "
                              f"{self.slat_flow.cond_channels} (the SLAT flow's cond_channels)")
        if self.ss_decoder.latent_channels != self.ss_flow.out_channels:
            raise ConfigError(f"model.ss_decoder: latent_channels {self.ss_decoder.latent_channels} differs from ss_flow.out_channels {self.ss_flow.out_channels}")
        self.ss_resolution = self.ss_flow.resolution * self.ss_decoder.upsample_factor
        if self.slat_flow.resolution != self.ss_resolution:
            raise ConfigError(f"model.slat_flow: resolution {self.slat_flow.resolution} differs from the decoded structure's {self.ss_resolution}")
        if rvc is not None:
            if not isinstance(rvc, dict):
                raise ConfigError(f"model.rvc: expected a mapping of VelocityCompensation options or null, got {type(rvc).__name__}")
            if self.gaussian_decoder is None:
                raise ConfigError("model.rvc: RVC renders the decoded SLAT; give model.gaussian_decoder (the structure fallback "
                                  "does not depend on the latent)")
            import inspect

            from recon3d.models.reconviagen.rvc import VelocityCompensation

            allowed = set(inspect.signature(VelocityCompensation.__init__).parameters) - {"self", "decode", "images", "cameras"}
            bad = sorted(set(rvc) - allowed)
            if bad:
                raise ConfigError(f"model.rvc: unknown VelocityCompensation options {bad}")
        if pose_refine is not None and not isinstance(pose_refine, dict):
            raise ConfigError(f"model.pose_refine: expected a mapping of PoseRefiner options or null, got {type(pose_refine).__name__}")
        self.per_view_mode, self.sampler_preset = per_view_mode, sampler_preset
        ss_base, slat_base = SAMPLER_PRESETS[sampler_preset]
        self.ss_sampler_params = _sampler_params(ss_base, ss_sampler, "model.ss_sampler")
        self.slat_sampler_params = _sampler_params(slat_base, slat_sampler, "model.slat_sampler")
        self.rvc, self.rvc_cameras, self.camera_mapping = (dict(rvc) if rvc is not None else None), rvc_cameras, camera_mapping
        self.n_renders, self.render_radius, self.render_fov = int(n_renders), float(render_radius), float(render_fov)
        self.pose_refine, self.rvc_background = (dict(pose_refine) if pose_refine is not None else None), rvc_background
        self.rvc_reference = bool(rvc_reference)
        self.max_views, self.render_backend, self.export_min_opacity = max_views, render_backend, float(export_min_opacity)
        C = self.slat_flow.out_channels
        self.register_buffer("slat_mean", torch.zeros(C))
        self.register_buffer("slat_std", torch.ones(C))
        if self.ss_encoder is not None:
            from recon3d.methods.trellis import _load_frozen_encoder

            _load_frozen_encoder(self.ss_encoder, ss_encoder_weights, ss_encoder_prefix)
        if ss_stage is not None:
            load_stage_weights({"flow.": self.ss_flow, "ggc.": self.ggc}, ss_stage)
        if slat_stage is not None:
            load_stage_weights({"flow.": self.slat_flow, "pvc.": self.pvc}, slat_stage)
        self._stage_normalization(slat_stage, slat_mean, slat_std)
        # Only the SS flow and the GGC train here (module docstring).
        for name in ("slat_flow", "pvc", "ss_decoder", "gaussian_decoder", "mesh_decoder", "ss_encoder"):
            part = getattr(self, name)
            if part is not None:
                part.requires_grad_(False)
        self.random_views = bool(random_views)
        self.lora_records = {}
        self.objective = _objective(objective, p_uncond, sigma_min)
        self._rasterizer = None

    def _stage_normalization(self, path: str | None, slat_mean, slat_std) -> None:
        """SLAT normalisation into the buffers: the slat stage checkpoint's (``slat_mean`` / ``slat_std``
        beside its ``flow.*``), given values checked against it (TrellisModule's rules:
        :func:`~recon3d.methods.trellis.resolve_slat_normalization`); a stage checkpoint without them
        and none given is one CheckpointError. No stage and none given: 0 / 1 (an untrained SLAT flow,
        or a ReconViaGenModule checkpoint loaded later, whose buffers carry them)."""
        from recon3d.methods.trellis import checkpoint_slat_normalization, resolve_slat_normalization

        found = checkpoint_slat_normalization(path, "flow.") if path is not None else None
        if path is not None and found is None and slat_mean is None:
            raise CheckpointError(f"{path}: no SLAT normalisation for model.slat_stage (keys 'slat_mean' / 'slat_std', which a "
                                  "ReconViaGenSLatFlowModule checkpoint stores); give model.slat_mean / slat_std (the per-channel "
                                  "values its SLAT flow was trained with)")
        out = resolve_slat_normalization(slat_mean, slat_std, found, f"{path} (model.slat_stage)", self.slat_flow.out_channels)
        if out is not None:
            self.slat_mean.copy_(torch.tensor(out[0]))
            self.slat_std.copy_(torch.tensor(out[1]))

    # -------------------------------------------------------------- conditions
    def input_views(self, batch: Batch) -> list[int]:
        V = batch.inputs.images.shape[1]
        return list(range(V if self.max_views is None else min(V, self.max_views)))

    def conditions(self, batch: Batch) -> dict[str, Any]:
        """Everything the samplers need from the input views: VGGT outputs, masks, SS and SLAT
        conditions (a tensor, or a list of per-view DINOv2 tokens for TRELLIS-M)."""
        views = self.input_views(batch)
        masks = self.input_masks(batch)
        vout = self.vggt_outputs(batch.inputs.images[:, views])
        if self.ggc is not None:
            ss = self.global_condition(self.ggc, batch, views, masks, vout)
        else:
            ss = list(self.dino_tokens(batch, views, masks).unbind(1))
        if self.pvc is not None:
            slat = self.view_condition(self.pvc, batch, views, masks, vout)
        else:
            slat = list(self.dino_tokens(batch, views, masks).unbind(1))
        return {"views": views, "masks": masks, "vggt": vout, "ss": ss, "slat": slat}

    def _sampler(self, params: dict, cond) -> tuple[FlowEulerSampler, Any]:
        if isinstance(cond, list):
            if len(cond) == 1:
                return FlowEulerSampler(**params), cond[0]
            return FlowEulerSampler(multi_condition="multidiffusion", **params), cond
        return FlowEulerSampler(**params), cond

    # -------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_structure(self, cond, generators: list[torch.Generator], names: list[str]) -> tuple[SparseVoxels, torch.Tensor]:
        """SS flow from per-object noise -> decoder logits ``(B, 1, R, R, R)`` -> occupied voxels (TRELLIS's grid)."""
        sampler, c = self._sampler(self.ss_sampler_params, cond)
        return self.structure_from_noise(sampler, c, generators, names, len(names))

    # TrellisModule's: the SS flow + decode from noise, the SLAT noise, the SLAT (de)normalisation.
    structure_from_noise = TrellisModule.structure_from_noise
    slat_noise = TrellisModule.slat_noise
    denormalize = TrellisModule.denormalize
    normalize = TrellisModule.normalize

    def sample_slat(self, cond, noise: SparseVoxels, hook=None) -> SparseVoxels:
        """SLAT flow from ``noise`` (optionally with a per-step hook) -> de-normalised latents."""
        sampler, c = self._sampler(self.slat_sampler_params, cond)
        x = sampler.sample(self.slat_flow, noise, c, hook=hook).samples
        return self.denormalize(x)

    def _slat_decoder_output(self, decoder: nn.Module, slat: SparseVoxels, kind: type, what: str):
        """As TrellisModule's, but only recon3d's own SLAT decoder classes are run through
        ``decode(slat, scale=1)``; any other part is called."""
        native = SLatGaussianDecoder if kind is Gaussians else SLatMeshDecoder
        return _run_decoder(decoder, slat, kind, what, native=native, note="")

    # TrellisModule's decoding: Gaussians (differentiable, for RVC) and meshes in recon3d's world, or the fallbacks.
    decode_gaussians = TrellisModule.decode_gaussians
    decode = TrellisModule.decode
    logits_meshes = TrellisModule.logits_meshes

    # -------------------------------------------------------------- cameras
    def vggt_cameras(self, images: torch.Tensor) -> Cameras:
        """VGGT's cameras ``(B, S)`` of ``images (B, S, 3, H, W)`` (its frame), the pose estimator of
        :class:`~recon3d.models.reconviagen.NearestRenderStart`."""
        return self.vggt_outputs(images)["cameras"]

    def predicted_cameras(self, batch: Batch, vout: dict) -> Cameras | None:
        """VGGT's input cameras, mapped into the dataset's world when the batch has input cameras."""
        cams = vout.get("cameras")
        true = batch.inputs.cameras
        if cams is None or true is None:
            return cams
        from recon3d.methods.vggt import similarity_to_world

        true = true[:, : cams.batch_shape[1]]
        T = similarity_to_world(cams, true)
        s = torch.linalg.det(T[:, :3, :3].double()).abs().pow(1 / 3)
        c2w = T[:, None].double() @ cams.c2w.double()
        c2w[..., :3, :3] = c2w[..., :3, :3] / s[:, None, None, None]
        return Cameras(c2w.float(), cams.K, cams.width, cams.height)

    def rvc_view_cameras(self, batch: Batch, views: list[int], masks: torch.Tensor, gaussians: Gaussians) -> tuple[Cameras, dict]:
        """Cameras of the input views in the generator's frame for RVC (``rvc_cameras``)."""
        images = batch.inputs.images[:, views]
        info: dict[str, Any] = {"source": self.rvc_cameras}
        if self.rvc_cameras == "inputs":
            if batch.inputs.cameras is None:
                raise DataError(f"batch of {list(batch.object_ids)[:3]}", "inputs.cameras: model.rvc_cameras 'inputs' needs posed "
                                "input views; use rvc_cameras: nearest_render for unposed ones")
            return batch.inputs.cameras[:, views], info
        from recon3d.models.reconviagen.pose import NearestRenderStart, PoseRefiner

        start = NearestRenderStart(self.n_renders, self.render_radius, self.render_fov, up_axis=self.up_axis,
                                   pose_estimator=self.vggt_cameras if self.vggt.camera_head is not None else None,
                                   background=self.rvc_background, mapping=self.camera_mapping,
                                   render_opts={"renderer": self.rasterizer()})
        cams = start(gaussians, images)
        info["nearest_render"] = start.last
        if self.pose_refine is not None:
            opts = {"background": self.rvc_background, "render_opts": {"renderer": self.rasterizer()}, **self.pose_refine}
            res = PoseRefiner(start=cams, **opts).refine_cameras(gaussians, images, masks=masks[:, views])
            cams, info["pose_fallback"] = res.cameras.to(images.device), res.fallback
        return cams, info

    # -------------------------------------------------------------- reconstruct
    @torch.no_grad()
    def reconstruct(self, batch: Batch) -> Reconstruction:
        """Gaussians (primary), mesh, voxels, SLAT and predicted cameras of every object."""
        from recon3d.models.refiners.base import test_time_optimization, trainable_copy

        ids = list(batch.object_ids)
        seeds = self.object_seeds(batch)
        c = self.conditions(batch)
        gens = lambda: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
        structure, logits = self.sample_structure(c["ss"], gens(), ids)
        coords = structure.replace(feats=structure.feats[:, :0])
        noise = self.slat_noise(coords, gens())
        extras: dict[str, Any] = {}
        # The plain sample: the result without RVC, the object the nearest-render cameras are found on, or
        # (rvc_reference) the reference RVC's input-view loss is compared with.
        plain_needed = self.rvc is None or self.rvc_cameras != "inputs" or self.rvc_reference
        slat = self.sample_slat(c["slat"], noise) if plain_needed else None
        pred_cams = self.predicted_cameras(batch, c["vggt"])
        if self.rvc is not None:
            from recon3d.models.reconviagen.rvc import VelocityCompensation

            views = c["views"]
            cams, info = self.rvc_view_cameras(batch, views, c["masks"], self.decode_gaussians(slat) if slat is not None else None)
            if info["source"] != "inputs":
                pred_cams = cams  # estimated in the object frame = the world up to TRELLIS's fixed map
            with test_time_optimization():
                images = trainable_copy(batch.inputs.images[:, views]).float()
                cams_t = Cameras(trainable_copy(cams.c2w).float(), trainable_copy(cams.K).float(), cams.width, cams.height, cams.projection)
                copy = lambda x: [trainable_copy(t) for t in x] if isinstance(x, list) else trainable_copy(x)  # noqa: E731
                cond = copy(c["slat"])
                n = noise.replace(coords=trainable_copy(noise.coords), feats=trainable_copy(noise.feats))
                decode = lambda x0: self.decode_gaussians(self.denormalize(x0))  # noqa: E731
                opts = {"background": self.rvc_background, "render_opts": {"renderer": self.rasterizer()}, **self.rvc}
                hook = VelocityCompensation(decode, images, cams_t, **opts)
                sampler, cc = self._sampler(self.slat_sampler_params, cond)
                x = sampler.sample(self.slat_flow, n, cc, hook=hook).samples
                after = hook.evaluate(x)
                plain = hook.evaluate(self.normalize(slat.replace(feats=trainable_copy(slat.feats)))) if slat is not None else None
                x = self.denormalize(x)
                slat = x.replace(feats=x.feats.detach())
            extras["rvc"] = {"history": hook.history, "all_dropped": hook.all_dropped, "cameras": info,
                             "view_loss": after.detach().cpu(), "view_loss_without_rvc": None if plain is None else plain.detach().cpu()}
        gaussians, meshes = self.decode(slat, structure, logits)
        voxels = trellis_voxels_to_world(structure, self.up_axis)
        extras.update({"mesh": meshes, "voxels": voxels, "slat": slat, "views_used": c["views"], **self.camera_head_status()})
        return Reconstruction(ids, gaussians, extras, cameras=pred_cams, seeds=seeds)

    def camera_head_status(self) -> dict:
        """What the predicted cameras rest on (:meth:`VGGTModule.camera_head_status`'s keys): VGGT is
        frozen here, so its camera head holds released weights only with ``model.vggt_weights``;
        without them it is its random initialisation (a VGGT-stage adapter file does not change the
        head) and the pose metrics get ``pose_caveat`` (flagged by the protocol)."""
        src = self.hparams.get("vggt_weights")
        caveat = None if src else ("VGGT camera head without pretrained weights (no model.vggt_weights): a random "
                                   "initialisation, not a measurement of ReconViaGen's poses")
        return {"pretrained_camera_head": bool(src), "camera_weights": src, "pose_caveat": caveat}

    # -------------------------------------------------------------- training (SS flow + GGC)
    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.ss_encoder is None:
            raise ConfigError("model.ss_encoder: ReconViaGenModule trains its SS flow + GGC on SS-VAE latents of the ground-truth "
                              "structure; give the encoder (and ss_encoder_weights)")
        if self.ggc is None:
            raise ConfigError("model.ggc: without a GGC there is nothing of ReconViaGen to train here; use TrellisModule")
        return ggc_ss_flow_losses(self, self.ss_flow, self.ss_encoder, self.ggc, self.objective, batch)

    # -------------------------------------------------------------- render / export (rasterizer: _TrellisBase's)
    render_reconstruction = TrellisModule.render_reconstruction
    export_reconstruction = TrellisModule.export_reconstruction
