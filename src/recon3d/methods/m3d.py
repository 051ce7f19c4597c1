"""M3D (Zhang et al., "M3D: Dual-Stream Selective State Spaces and Depth-Driven Framework for
High-Fidelity Single-View 3D Reconstruction", 2024) as a LightningModule.

Network (paper §III-A..C, :class:`~recon3d.models.m3d.M3DNetwork`): a pixel-aligned shallow RGB
encoder, a deep ROI/global encoder, an optional depth stream on a monocular depth prior fused by
eq. 3's generalised addition, and an implicit SDF + colour decoder (eq. 4). Each piece is a typed
part chosen by ``class_path`` in the YAML, so the §V-A ablation is one override file each
(``configs/m3d/{baseline,exp1,exp2,m3d}.yaml``):

==========  ===========================  ==================================  =================
ablation    ``shallow``                  ``deep``                            ``depth_encoder``
==========  ===========================  ==================================  =================
baseline    ResNetShallowEncoder basic   ResNet18DeepEncoder (SSR)           null
exp1        ResNetShallowEncoder enh.    ResNet18DeepEncoder                 null
exp2        ResNetShallowEncoder enh.    ResNet18DeepEncoder                 DepthEncoder
m3d         ResNetShallowEncoder enh.    SelectiveAttentionDeepEncoder       DepthEncoder
==========  ===========================  ==================================  =================

The override files swap only classes; sizes (``in_channels``, ``roi_size``, ``out_dim``) carry over
from the base config (jsonargparse keeps the init_args the new class accepts).

Supervision (paper §III-D) in two stages, switched by a curriculum in the config:

``sdf`` (stage 1)
    ``L3D = |s(x) - ŝ(x)|`` (eq. 9) over points ``x`` near the true surface and uniform in the
    object's box (``batch.geometry.sdf_points/sdf_values``; exact for the synthetic set), plus
    ``num_surface_rays`` points on the input rays where the true depth puts the surface
    (``ŝ = 0`` there; only where the depth map shows the object alone, e.g. synthetic data).
``full`` (stage 2)
    ``L = α L3D + β Lrgb + γ Ld + δ Ln`` (eq. 13) with ``α = 1, β = γ = 0.1, δ = 0.01``: VolSDF
    rendering (eq. 6-8, :class:`~recon3d.render.VolumeRenderer` with a learnable-β
    :class:`~recon3d.render.sdf_density.LaplaceDensity`) of ``num_render_rays`` random rays of the
    target view(s); ``Lrgb`` = L1 (eq. 10), ``Ld`` = squared z-depth error on the object's pixels
    (eq. 11), ``Ln`` = ``|n - n̂|_1 + (1 - n·n̂)`` on the object's pixels (eq. 12; needs target normals).

The curriculum: with ``stage: auto`` stage 2 starts at ``full_loss_start`` (epochs or steps,
``curriculum_unit``) and its weights ramp linearly to ``loss_weights`` over ``full_loss_ramp``
units (0: a step switch). ``stage: sdf`` / ``stage: full`` force one stage.

Depth prior (the depth stream's input), ``depth_source``:

- ``prior``: ``batch.extras["depth_prior"]`` (``(B, 1, H, W)``, e.g. the Depth Anything cache that
  :class:`~recon3d.data.formats.front3d.Front3DDataset` reads); missing → :class:`DataError`
  naming ``recon3d data depth``, the command that makes the cache;
- ``ground_truth``: ``batch.inputs.depths`` (the rendered depth of the input view);
- ``auto``: the prior when the batch has one, else the input view's rendered depth.

Optimisation (§IV-A): Adam, lr 6e-5, StepLR to 1e-5 at epoch 110 of 200.

Evaluation: marching cubes of the SDF on a ``mesh_resolution^3`` grid over the object's box, surface
samples, CD / F-score / NC under the SSR protocol (``EvaluationProtocol(geometry_preset="m3d")``);
``test`` also writes ``per_class.csv`` (per class as in Table I, the class-mean and the
object-mean row), classes from ``extras["class_code"]`` or a regex on the object id.

Paper vs official code (Dual-S3D) and vs this implementation:

- pixel features: paper RGB ``F_vis`` + fused ``F_dge`` (default); official depth stream only
  (``pixel_features: depth``);
- depth prior: official stores uint8 min-max disparity of Depth Anything V1; here float disparity,
  min-max normalised per image inside :class:`~recon3d.models.m3d.DepthEncoder`;
- curriculum: the paper gives no switch epoch; the official code ramps over epochs 30 → 80, the
  default here (``full_loss_start: 30``, ``full_loss_ramp: 50``);
- sums in eq. 9-12 are means here (independent of the number of sampled points/rays);
- SSR's Ld is scale-and-shift invariant against a monocular estimate; eq. 11 (what M3D writes) is a
  plain L2 to the true depth, implemented as written;
- SSR's ray points query the ground-truth SDF grid along the rays; the loader gives uniform +
  near-surface samples (SSR's other set) and the surface points on the input rays stand in where the
  depth map is object-only (``num_surface_rays``; 0 for 3D-FRONT, where depth shows the whole scene);
- 3D-FRONT inputs: ``ReconDataModule`` composites each view on the background with its mask, so the
  network sees the object cut out of the scene (amodal mask), where SSR feeds the whole image;
- 3D-FRONT geometry metrics compare against the marching-cubes surface of SSR's 64^3 SDF grid
  (``Front3DDataset(num_surface_points=...)``), not the 3D-FUTURE mesh SSR's evaluation reads.

Building in Python: the ``lazy_instance`` defaults are one object per process; pass the parts
explicitly when constructing several modules in one process (the CLI builds fresh ones).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from jsonargparse import lazy_instance

from recon3d.data.batch import Batch
from recon3d.data.cameras import Cameras
from recon3d.data.depth_cache import DEPTH_CACHE_COMMAND
from recon3d.data.formats.front3d import FRONT3D_CLASSES
from recon3d.data.rays import camera_rays
from recon3d.errors import ConfigError, DataError
from recon3d.methods.base import NonFiniteGuard, ReconModule, depth_mse, geometry_metric_names, own_instance
from recon3d.metrics.protocol import EvaluationProtocol
from recon3d.models.m3d import DepthEncoder, M3DNetwork, ResNetShallowEncoder, SelectiveAttentionDeepEncoder
from recon3d.render.sdf_density import LaplaceDensity
from recon3d.render.volume import VolumeRenderer
from recon3d.representations import Meshes, NeuralField, RenderOutput
from recon3d.representations.reconstruction import Reconstruction
from recon3d.utils.checks import check_option, merge_weights
from recon3d.utils.io import atomic_path

__all__ = ["M3DModule", "PAPER_LOSS_WEIGHTS", "FRONT3D_CLASSES", "DEPTH_COMMAND"]

log = logging.getLogger(__name__)

#: eq. 13: α (L3D) = 1, β (Lrgb) = γ (Ld) = 0.1, δ (Ln) = 0.01 (paper §III-D).
PAPER_LOSS_WEIGHTS = {"sdf": 1.0, "rgb": 0.1, "depth": 0.1, "normal": 0.01}
#: The command named when the depth prior is missing (the data layer's, for any cache folder).
DEPTH_COMMAND = DEPTH_CACHE_COMMAND.format(out_dir="<cache dir>")


def _fmt(v: float) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


class M3DModule(ReconModule):
    """M3D: dual-stream single-view SDF reconstruction with two-stage supervision (module docstring).

    Args:
        shallow: pixel-aligned RGB encoder (``out_channels``): ``ResNetShallowEncoder`` with
            ``block: enhanced`` (M3D) or ``basic`` (SSR baseline).
        deep: ROI/global encoder taking ``shallow``'s channels (``in_channels``):
            ``SelectiveAttentionDeepEncoder`` (M3D) or ``ResNet18DeepEncoder`` (SSR).
        depth_encoder: depth stream on the depth prior (``DepthEncoder``), or null (RGB only).
        fusion: eq. 3's fusion; default ``GeneralizedAddition`` built from the channel counts.
        density: SDF → density (eq. 6), VolSDF Laplace CDF with learnable β (SSR: init 0.1, min 1e-4).
        **network: the rest of :class:`~recon3d.models.m3d.M3DNetwork`'s arguments, by name, beside
            the others in a config (``model.init_args.hidden``): ``pixel_features`` (``auto``: paper;
            ``rgb``, ``rgb+fused``, ``fused``, ``depth``: official code), ``num_classes`` (one-hot
            class code length appended to the global feature; 3D-FRONT: 9, 0: none) and the
            implicit decoder's ``multires, hidden, num_layers, feature_size, sphere_radius``
            (SSR: 6, 256, 8, 256, 0.6). They are the network's own defaults and checks, declared
            once there; the config parser reads them from it.
        bound: half-size of the canonical cube the decoder works in (rendering box, marching cubes);
            with ``extras["cube_scale"/"cube_offset"]`` (3D-FRONT) the object box is its preimage.
        stage: ``auto`` (curriculum), ``sdf`` (stage 1 only) or ``full`` (stage 2 from the start).
        full_loss_start: epoch/step at which stage 2 starts (``curriculum_unit``).
        full_loss_ramp: epochs/steps over which the rendering weights ramp up to ``loss_weights``.
        curriculum_unit: ``epoch`` or ``step``.
        loss_weights: ``sdf``/``rgb``/``depth``/``normal`` weights (paper defaults, eq. 13).
        num_sdf_samples: SDF samples per object and step, drawn from ``batch.geometry.sdf_points``.
        num_surface_rays: input-view pixels per object whose depth gives an ``ŝ = 0`` point (0: off).
        num_render_rays: rays per object rendered in stage 2.
        n_samples, n_importance: VolSDF samples per ray (stratified, then importance).
        last_delta: segment length of the last sample: ``"bin"`` (default: the object box is a
            bounded scene, segments add up to the chord) or ``"inf"`` (VolSDF's code, written for
            unbounded scenes with a background model); see :mod:`recon3d.render.volume`.
        eval_max_side: evaluation renders at most this many pixels on the longer side, upsampled
            to the target size (None: full resolution).
        eval_chunk: rays per rendering chunk / points per decoder chunk at evaluation.
        depth_source: ``prior``, ``ground_truth`` or ``auto`` (module docstring).
        optimizer: ``adam`` (paper) or ``adamw``.
        lr: initial learning rate (paper: 6e-5).
        lr_decay_at: StepLR step in ``lr_decay_unit`` (paper: epoch 110).
        lr_after_decay: learning rate after the step (paper: 1e-5).
        lr_decay_unit: ``epoch`` or ``step``.
        weight_decay: optimizer weight decay.
        mesh_resolution: marching-cubes grid for evaluation geometry.
        export_resolution: marching-cubes grid for exported meshes.
        class_names: names of the ``class_code`` entries.
        class_pattern: regex whose group 1 is the class in an object id (used without ``class_code``).
        evaluation, init_weights, init_weights_ignore, nonfinite, vis_views, validation_mode, eval_seed: see
            :class:`~recon3d.methods.base.ReconModule`.

    Run-time options (the command line wins over a checkpoint, :class:`ReconModule`): evaluation
    render size and chunk, the evaluation and export marching-cubes grids, the class names and
    pattern of the per-class report.
    """

    RUNTIME_OPTIONS = ReconModule.RUNTIME_OPTIONS | {
        "eval_max_side", "eval_chunk", "mesh_resolution", "export_resolution", "class_names", "class_pattern",
    }
    EXPORT_REPRESENTATION = Meshes

    def __init__(
        self,
        shallow: nn.Module = lazy_instance(ResNetShallowEncoder, block="enhanced"),  # noqa: B008
        deep: nn.Module = lazy_instance(SelectiveAttentionDeepEncoder),  # noqa: B008
        depth_encoder: nn.Module | None = lazy_instance(DepthEncoder),  # noqa: B008
        fusion: nn.Module | None = None,
        density: LaplaceDensity = lazy_instance(LaplaceDensity, beta_init=0.1, beta_min=1e-4),  # noqa: B008
        bound: float = 1.0,
        stage: Literal["auto", "sdf", "full"] = "auto",
        full_loss_start: int = 30,
        full_loss_ramp: int = 50,
        curriculum_unit: Literal["epoch", "step"] = "epoch",
        loss_weights: dict[str, float] | None = None,
        num_sdf_samples: int = 4096,
        num_surface_rays: int = 0,
        num_render_rays: int = 1024,
        n_samples: int = 64,
        n_importance: int = 32,
        last_delta: Literal["bin", "inf"] = "bin",
        eval_max_side: int | None = 128,
        eval_chunk: int = 8192,
        depth_source: Literal["prior", "ground_truth", "auto"] = "prior",
        optimizer: Literal["adam", "adamw"] = "adam",
        lr: float = 6e-5,
        lr_decay_at: int = 110,
        lr_after_decay: float = 1e-5,
        lr_decay_unit: Literal["epoch", "step"] = "epoch",
        weight_decay: float = 0.0,
        mesh_resolution: int = 64,
        export_resolution: int = 128,
        class_names: tuple[str, ...] | list[str] = FRONT3D_CLASSES,
        class_pattern: str | None = None,
        evaluation: EvaluationProtocol | None = None,
        init_weights: str | None = None,
        nonfinite: NonFiniteGuard | None = None,
        vis_views: int = 4,
        init_weights_ignore: list[str] | None = None,
        validation_mode: Literal["render", "loss"] = "render",
        eval_seed: int = 0,
        **network,
    ):
        super().__init__(evaluation=evaluation, init_weights=init_weights, nonfinite=nonfinite, vis_views=vis_views,
                         init_weights_ignore=init_weights_ignore, validation_mode=validation_mode, eval_seed=eval_seed)
        shallow, deep, depth_encoder, density = (own_instance(m) for m in (shallow, deep, depth_encoder, density))
        for name, value, allowed in (
            ("stage", stage, ("auto", "sdf", "full")),
            ("curriculum_unit", curriculum_unit, ("epoch", "step")),
            ("lr_decay_unit", lr_decay_unit, ("epoch", "step")),
            ("depth_source", depth_source, ("prior", "ground_truth", "auto")),
            ("optimizer", optimizer, ("adam", "adamw")),
        ):
            if value not in allowed:
                raise ConfigError(f"model.{name}: expected one of {allowed}, got {value!r}")
        weights = merge_weights("model.loss_weights", PAPER_LOSS_WEIGHTS, loss_weights)
        for name, value, low, kw in (
            ("lr", lr, 0.0, {"strict": True}), ("lr_after_decay", lr_after_decay, 0.0, {}), ("weight_decay", weight_decay, 0.0, {}),
            ("lr_decay_at", lr_decay_at, 0, {"integer": True}), ("full_loss_start", full_loss_start, 0, {"integer": True}),
            ("n_samples", n_samples, 1, {"integer": True}), ("n_importance", n_importance, 0, {"integer": True}),
            ("eval_chunk", eval_chunk, 1, {"integer": True}), ("eval_max_side", eval_max_side, 1, {"integer": True, "allow_none": True}),
            ("mesh_resolution", mesh_resolution, 2, {"integer": True}), ("export_resolution", export_resolution, 2, {"integer": True}),
            ("bound", bound, 0.0, {"strict": True}),
        ):
            check_option(f"model.{name}", value, low, **kw)
        deep_in = getattr(deep, "in_channels", None)
        if deep_in is not None and int(deep_in) != int(shallow.out_channels):
            raise ConfigError(
                f"model.deep.init_args.in_channels={deep_in} must equal the shallow encoder's out_channels "
                f"({shallow.out_channels}, {type(shallow).__name__})"
            )
        if num_sdf_samples < 0 or num_surface_rays < 0 or num_render_rays < 1 or full_loss_ramp < 0:
            raise ConfigError("model: num_sdf_samples, num_surface_rays, full_loss_ramp must be >= 0 and num_render_rays >= 1")
        self.save_hyperparameters()  # sub-models: their config (recon3d fit) or left out, never pickled (ReconModule)
        self.net = M3DNetwork(shallow, deep, depth_encoder, fusion, **network)
        self.density = density
        self.renderer = VolumeRenderer(aabb=(-bound, bound), n_samples=n_samples, n_importance=n_importance,
                                       sdf_to_alpha=density, background="white", chunk=eval_chunk, normals="auto",
                                       last_delta=last_delta)
        self.bound = float(bound)
        self.stage = stage
        self.full_loss_start, self.full_loss_ramp, self.curriculum_unit = full_loss_start, full_loss_ramp, curriculum_unit
        self.loss_weights = weights
        self.num_sdf_samples, self.num_surface_rays, self.num_render_rays = num_sdf_samples, num_surface_rays, num_render_rays
        self.eval_max_side, self.eval_chunk = eval_max_side, eval_chunk
        self.depth_source = depth_source
        self.optimizer_name, self.lr, self.weight_decay = optimizer, lr, weight_decay
        self.lr_decay_at, self.lr_after_decay, self.lr_decay_unit = lr_decay_at, lr_after_decay, lr_decay_unit
        self.mesh_resolution, self.export_resolution = mesh_resolution, export_resolution
        self.class_names = tuple(class_names)
        self.class_pattern = re.compile(class_pattern) if class_pattern else None
        self._object_class: dict[str, str] = {}
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ inputs
    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg)

    def depth_input(self, batch: Batch) -> torch.Tensor | None:
        """The depth stream's input ``(B, 1, H, W)`` at the input image's size (see ``depth_source``)."""
        if self.net.depth is None:
            return None
        H, W = batch.inputs.images.shape[-2:]
        prior = batch.extras.get("depth_prior")
        gt = None if batch.inputs.depths is None else batch.inputs.depths[:, 0]
        if self.depth_source == "ground_truth":
            if gt is None:
                raise DataError(f"batch of {batch.object_ids[:3]}", "model.depth_source=ground_truth needs inputs.depths; "
                                "the dataset gives none (use depth_source: prior with a cache made by " + DEPTH_COMMAND + ")")
            d = gt
        elif prior is not None:
            d = prior if prior.ndim == 4 else prior[:, None]
        elif self.depth_source == "auto" and gt is not None:
            self._warn_once("depth", "M3D: no depth_prior in the batch; the depth stream reads the input view's rendered depth")
            d = gt
        else:
            raise DataError(
                f"batch of {batch.object_ids[:3]}",
                "M3D's depth stream needs a depth prior (extras['depth_prior']) and the batch has none"
                + ("" if self.depth_source == "prior" else " and no inputs.depths")
                + f"; cache Depth Anything depth with: {DEPTH_COMMAND} and give the dataset its depth_dir"
                + (" (or set model.depth_source: ground_truth)" if gt is not None else ""),
            )
        if d.shape[-2:] != (H, W):
            d = F.interpolate(d.float(), (H, W), mode="bilinear", align_corners=False)
        return d.float()

    def roi_boxes(self, batch: Batch) -> torch.Tensor | None:
        """``(B, 4)`` pixel boxes: ``extras["roi_box"]``, else the input mask's box, else None (whole image)."""
        box = batch.extras.get("roi_box")
        if box is not None:
            return box.float()
        m = batch.inputs.masks
        if m is None:
            return None
        m = m[:, 0, 0] > 0.5  # B H W
        H, W = m.shape[-2:]
        boxes = []
        for mb in m:
            ys, xs = torch.nonzero(mb, as_tuple=True)
            if len(xs) == 0:
                boxes.append(torch.tensor([0.0, 0.0, W, H]))
            else:
                boxes.append(torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float().cpu())
        return torch.stack(boxes).to(batch.inputs.images)

    def class_codes(self, batch: Batch) -> torch.Tensor | None:
        code = batch.extras.get("class_code")
        if code is None or self.net.num_classes == 0:
            return None
        if code.shape[-1] != self.net.num_classes:
            raise DataError(f"batch of {batch.object_ids[:3]}", f"extras['class_code'] has {code.shape[-1]} classes; "
                            f"model.num_classes is {self.net.num_classes}")
        return code.float()

    def _cube(self, batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return batch.extras.get("cube_scale"), batch.extras.get("cube_offset")

    def to_canonical(self, batch: Batch, points: torch.Tensor) -> torch.Tensor:
        """World/object-frame points ``(B, N, 3)`` → the decoder's canonical cube."""
        s, o = self._cube(batch)
        if s is None:
            return points
        return points * s[:, None].to(points) + (0 if o is None else o[:, None].to(points))

    def sdf_to_world(self, batch: Batch, sdf: torch.Tensor) -> torch.Tensor:
        """Canonical SDF ``(B, N)`` → world units (SSR's rescale by the mean cube scale)."""
        s, _ = self._cube(batch)
        return sdf if s is None else sdf / s.mean(-1, keepdim=True).to(sdf)

    def object_boxes(self, batch: Batch) -> torch.Tensor:
        """``(B, 2, 3)`` world boxes: the canonical cube ``[-bound, bound]^3`` mapped back."""
        B = len(batch)
        lo = torch.full((B, 3), -self.bound, device=self.device)
        hi = torch.full((B, 3), self.bound, device=self.device)
        s, o = self._cube(batch)
        if s is not None:
            o = torch.zeros_like(s) if o is None else o
            lo, hi = (lo - o) / s, (hi - o) / s
        return torch.stack([torch.minimum(lo, hi), torch.maximum(lo, hi)], 1)

    def encode(self, batch: Batch) -> dict:
        """Image features of the (single) input view of each object."""
        if batch.inputs.num_views != 1:
            self._warn_once("views", f"M3D is single-view; using the first of {batch.inputs.num_views} input views")
        return self.net.encode(batch.inputs.images[:, 0], self.depth_input(batch), self.roi_boxes(batch), self.class_codes(batch))

    def _decode(self, batch: Batch, enc: dict, points: torch.Tensor, idx: slice | None = None) -> dict[str, torch.Tensor]:
        """Decode world points ``(b, N, 3)`` for objects ``idx`` of the batch (all by default)."""
        idx = idx or slice(None)
        cams = batch.inputs.cameras[idx, 0]
        sub = {k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in enc.items()}
        extras_view = _SliceExtras(batch, idx)
        out = self.net.decode(sub, cams, points, self.to_canonical(extras_view, points))
        out["sdf_world"] = self.sdf_to_world(extras_view, out["sdf"])
        return out

    def _field(self, batch: Batch, enc: dict, b: int):
        idx = slice(b, b + 1)

        def field(pts: torch.Tensor) -> dict[str, torch.Tensor]:
            out = self._decode(batch, enc, pts, idx)
            return {"sdf": out["sdf_world"], "rgb": out["rgb"]}

        return field

    def fields(self, batch: Batch, enc: dict) -> list[NeuralField]:
        """One SDF/colour field per object (``points (1, N, 3) -> {"sdf", "rgb"}``) in its box."""
        boxes = self.object_boxes(batch)
        return [NeuralField(self._field(batch, enc, b), boxes[b], 1) for b in range(len(batch))]

    def reconstruct(self, batch: Batch) -> Reconstruction:
        """One encode of the batch; the representation is the list of per-object SDF fields (each
        closed over the batch's features, in the object's world box)."""
        batch.require("inputs.cameras", who="M3D")  # pixel-aligned features project through the input camera
        enc = self.encode(batch)
        return Reconstruction(list(batch.object_ids), self.fields(batch, enc), {"encoding": enc})

    # ------------------------------------------------------------------ rendering
    def _render_rays(self, fields: list[NeuralField], o: torch.Tensor, d: torch.Tensor, fwd: torch.Tensor,
                     renderer: VolumeRenderer | None = None) -> dict[str, torch.Tensor]:
        """Render rays ``(B, R, 3)`` of the per-object ``fields``, each in its own box: ``rgb (B,R,3)``,
        ``depth``, ``alpha (B,R)`` and, with the training renderer, ``normal (B,R,3)``."""
        renderer = renderer or self.renderer
        outs = []
        for b, field in enumerate(fields):
            renderer.aabb = field.aabb.to(o)
            parts = [renderer.render_rays(field.fn, o[b : b + 1, i : i + self.eval_chunk],
                                          d[b : b + 1, i : i + self.eval_chunk], fwd[b : b + 1, i : i + self.eval_chunk])
                     for i in range(0, o.shape[1], self.eval_chunk)]
            res = {k: torch.cat([getattr(p, k) for p in parts], 1) for k in ("rgb", "depth", "alpha")}
            if parts[0].normal is not None:
                res["normal"] = torch.cat([p.normal for p in parts], 1)
            outs.append(res)
        return {k: torch.cat([x[k] for x in outs]) for k in outs[0]}

    @torch.no_grad()
    def render_reconstruction(self, rec: Reconstruction, cameras: Cameras) -> RenderOutput:
        """VolSDF renders ``rgb (B,V,3,H,W)``, ``depth (B,V,1,H,W)``, ``alpha`` (opacity) of ``cameras``.

        Rendered at most ``eval_max_side`` pixels on the longer side and upsampled to the cameras'
        size; deterministic samples (no jitter), no normals (evaluation runs without autograd).
        """
        B, V = cameras.batch_shape
        H, W = cameras.height, cameras.width
        h, w = H, W
        if self.eval_max_side and max(H, W) > self.eval_max_side:
            f = self.eval_max_side / max(H, W)
            h, w = max(1, round(H * f)), max(1, round(W * f))
        cams = cameras.resized(w, h) if (h, w) != (H, W) else cameras
        o, d = camera_rays(cams)
        fwd = cams.c2w[..., :3, 2][:, :, None, None, :].expand_as(d)
        o, d, fwd = (x.reshape(B, V * h * w, 3) for x in (o, d, fwd))
        r = self.renderer
        renderer = VolumeRenderer(r.aabb, r.n_samples, r.n_importance, self.density, "white", self.eval_chunk, "none",
                                  perturb=False, min_near=r.min_near, last_delta=r.last_delta)
        out = self._render_rays(rec.representation, o, d, fwd, renderer)

        def img(x: torch.Tensor, c: int) -> torch.Tensor:
            x = x.reshape(B, V, h, w, c).permute(0, 1, 4, 2, 3)
            if (h, w) != (H, W):
                x = F.interpolate(x.flatten(0, 1), (H, W), mode="bilinear", align_corners=False).reshape(B, V, c, H, W)
            return x

        return RenderOutput(img(out["rgb"], 3), alpha=img(out["alpha"][..., None], 1), depth=img(out["depth"][..., None], 1))

    # ------------------------------------------------------------------ losses
    def curriculum_factor(self) -> float:
        """Scale of the stage-2 (rendering) weights now: 0 in stage 1, ramping to 1 in stage 2."""
        if self.stage == "sdf":
            return 0.0
        if self.stage == "full":
            return 1.0
        t = self.current_epoch if self.curriculum_unit == "epoch" else self.global_step
        if t < self.full_loss_start:
            return 0.0
        if self.full_loss_ramp <= 0:
            return 1.0
        return min(1.0, (t - self.full_loss_start + 1) / self.full_loss_ramp)

    def _sdf_points(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, N, 3)`` points with known SDF ``(B, N)`` (canonical units): geometry samples + surface rays."""
        pts, vals = [], []
        geo = batch.geometry
        if self.num_sdf_samples and geo.sdf_points is not None and geo.sdf_values is not None:
            B, S = geo.sdf_values.shape
            n = min(self.num_sdf_samples, S)
            sel = torch.rand(B, S, device=geo.sdf_values.device).argsort(-1)[:, :n]
            pts.append(torch.gather(geo.sdf_points, 1, sel[..., None].expand(-1, -1, 3)))
            vals.append(torch.gather(geo.sdf_values, 1, sel))
        if self.num_surface_rays and batch.inputs.depths is not None:
            sp = self._surface_ray_points(batch)
            if sp is not None:
                pts.append(sp)
                vals.append(torch.zeros(sp.shape[:2], device=sp.device, dtype=sp.dtype))
        if not pts:
            batch.require("geometry.sdf_points", "geometry.sdf_values", who="M3D's L3D (eq. 9)")
            raise ConfigError("model: num_sdf_samples and num_surface_rays are both 0; L3D (eq. 9) has no points")
        return torch.cat(pts, 1), torch.cat(vals, 1)

    def _surface_ray_points(self, batch: Batch) -> torch.Tensor | None:
        """Points where the input rays meet the true surface (``ŝ = 0``), from the input depth and mask."""
        depth = batch.inputs.depths[:, 0, 0]  # B H W
        valid = depth > 0
        if batch.inputs.masks is not None:
            valid &= batch.inputs.masks[:, 0, 0] > 0.99
        B, H, W = depth.shape
        flat = valid.reshape(B, -1).float()
        if (flat.sum(-1) == 0).any():
            return None
        n = self.num_surface_rays
        idx = torch.multinomial(flat, n, replacement=True)  # B n
        u = (idx % W).float() + 0.5
        v = torch.div(idx, W, rounding_mode="floor").float() + 0.5
        cams = batch.inputs.cameras[:, 0]
        o, d = camera_rays(cams, torch.stack([u, v], -1).to(depth))
        z = torch.gather(depth.reshape(B, -1), 1, idx)
        fwd = cams.c2w[:, None, :3, 2]
        t = z / (d * fwd).sum(-1).clamp_min(1e-6)
        return o + t[..., None] * d

    def _sample_target_rays(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``num_render_rays`` random pixels per object over its target views, with their targets."""
        tg = batch.targets
        cams = tg.cameras
        B, V = cams.batch_shape
        H, W = cams.height, cams.width
        n = self.num_render_rays
        dev = tg.images.device
        flat = torch.randint(0, V * H * W, (B, n), device=dev)
        vi = torch.div(flat, H * W, rounding_mode="floor")
        pix = flat % (H * W)
        u = (pix % W).float() + 0.5
        v = torch.div(pix, W, rounding_mode="floor").float() + 0.5
        c2w = torch.gather(cams.c2w, 1, vi[..., None, None].expand(-1, -1, 4, 4))
        K = torch.gather(cams.K, 1, vi[..., None, None].expand(-1, -1, 3, 3))
        ray_cams = Cameras(c2w, K, W, H)  # one camera per ray: (B, n)
        o, d = camera_rays(ray_cams, torch.stack([u, v], -1)[..., None, :].to(c2w))
        o, d = o[:, :, 0], d[:, :, 0]
        fwd = c2w[..., :3, 2]

        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            C = x.shape[2]
            x = x.permute(0, 1, 3, 4, 2).reshape(B, V * H * W, C)
            return torch.gather(x, 1, flat[..., None].expand(-1, -1, C))

        return {"o": o, "d": d, "fwd": fwd, "rgb": pick(tg.images), "mask": pick(tg.masks),
                "depth": pick(tg.depths), "normal": pick(tg.normals)}

    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        batch.require("inputs.cameras", who="M3D")
        w = self.loss_weights
        enc = self.encode(batch)
        pts, target = self._sdf_points(batch)
        pred = self._decode(batch, enc, pts)["sdf"]
        terms: dict[str, torch.Tensor] = {"sdf": (pred - target.to(pred)).abs().mean()}
        loss = w["sdf"] * terms["sdf"]
        factor = self.curriculum_factor()
        terms["stage"] = torch.tensor(1.0 if factor == 0 else 2.0, device=pred.device)
        if factor > 0:
            rays = self._sample_target_rays(batch)
            out = self._render_rays(self.fields(batch, enc), rays["o"], rays["d"], rays["fwd"])
            terms["rgb"] = (out["rgb"] - rays["rgb"]).abs().mean()
            fg = rays["mask"][..., 0] > 0.5 if rays["mask"] is not None else torch.ones_like(out["depth"], dtype=torch.bool)
            if rays["depth"] is not None:
                terms["depth"] = depth_mse(out["depth"], rays["depth"][..., 0], fg)
            else:
                self._warn_once("no_depth", "M3D stage 2: the targets have no depth; Ld (eq. 11) is off")
            if rays["normal"] is not None:
                n_pred = F.normalize(out["normal"], dim=-1, eps=1e-8)
                n_gt = rays["normal"]
                valid = fg & (n_gt.norm(dim=-1) > 0.5)
                per = (n_pred - n_gt).abs().sum(-1) + (1 - (n_pred * n_gt).sum(-1))
                terms["normal"] = (per * valid).sum() / valid.sum().clamp_min(1)
            else:
                self._warn_once("no_normal", "M3D stage 2: the targets have no normals; Ln (eq. 12) is off")
            for k in ("rgb", "depth", "normal"):
                if k in terms:
                    loss = loss + factor * w[k] * terms[k]
            terms["curriculum"] = torch.tensor(factor, device=pred.device)
            terms["beta"] = self.density.beta.detach()
        terms["loss"] = loss
        return terms

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        cls = torch.optim.Adam if self.optimizer_name == "adam" else torch.optim.AdamW
        return cls(params, lr=self.lr, weight_decay=self.weight_decay)

    def lr_factor(self, step: int) -> float:
        """Step decay (§IV-A: 6e-5 → 1e-5 at epoch 110): ``lr_after_decay / lr`` from ``lr_decay_at``
        on, counted in epochs or steps (``lr_decay_unit``); a pure function of the restored loop
        counters, so resume stays bit-identical (see ``ReconModule.lr_factor``)."""
        now = step if self.lr_decay_unit == "step" else int(self.current_epoch)
        return self.lr_after_decay / self.lr if now >= self.lr_decay_at else 1.0

    # ------------------------------------------------------------------ geometry and export
    @torch.no_grad()
    def field_mesh(self, field: NeuralField, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Marching-cubes mesh ``verts (V, 3)`` (world), ``faces (F, 3)`` of one object's field on a
        ``resolution^3`` grid over its box (raises EmptySurfaceError without a zero level set)."""
        from recon3d.render.isosurface import marching_cubes_fast

        box = field.aabb.to(self.device)
        axes = [torch.linspace(float(box[0, i]), float(box[1, i]), resolution, device=self.device) for i in range(3)]
        pts = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(1, -1, 3)
        # The field's world-scaled SDF has the canonical one's zero set and, being a constant
        # multiple of it, the same linear interpolation along grid edges.
        vals = [field.fn(pts[:, i : i + self.eval_chunk])["sdf"] for i in range(0, pts.shape[1], self.eval_chunk)]
        grid = torch.cat(vals, 1).reshape(resolution, resolution, resolution)
        return marching_cubes_fast(grid.float(), box.float())

    def mesh(self, batch: Batch, enc: dict, b: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Marching-cubes mesh of object ``b`` of an encoded batch (see :meth:`field_mesh`)."""
        return self.field_mesh(self.fields(batch, enc)[b], resolution)

    @torch.no_grad()
    def reconstruction_meshes(self, rec: Reconstruction, batch: Batch | None = None, resolution: int | None = None) -> Meshes:
        """Each object's marching-cubes mesh at ``resolution`` (default ``mesh_resolution``; empty
        where the SDF has no zero level set in the box), cached per resolution in ``rec.extras``."""
        from recon3d.render.isosurface import EmptySurfaceError

        res = resolution or self.mesh_resolution
        key = f"mesh@{res}"
        if isinstance(rec.get(key), Meshes):
            return rec.get(key)
        verts, faces = [], []
        for field in rec.representation:
            try:
                v, f = self.field_mesh(field, res)
            except EmptySurfaceError:
                v, f = torch.zeros(0, 3, device=self.device), torch.zeros(0, 3, dtype=torch.long, device=self.device)
            verts.append(v)
            faces.append(f)
        rec.extras[key] = Meshes(verts, faces)
        return rec.extras[key]

    empty_surface_reason = "no SDF zero level set in the object's box"

    @torch.no_grad()
    def reconstruction_geometry(self, rec: Reconstruction, batch: Batch) -> dict[str, torch.Tensor] | None:
        """Surface samples ``points (B, P, 3)``, ``normals`` of each object's marching-cubes mesh.

        An object with no zero level set yet (untrained) gets uniform points in its box instead,
        so it scores badly rather than dropping out of the mean (and a note says so).
        """
        geo = super().reconstruction_geometry(rec, batch)
        n = geo["points"].shape[1]
        for b, ok in enumerate(geo.pop("valid").tolist()):
            if ok:
                continue
            oid = rec.object_ids[b]
            self._warn_once(f"empty:{oid}", f"M3D: {oid} has no SDF zero level set yet; scored as uniform points")
            if self.evaluation is not None:
                self.evaluation.note([oid], geometry_metric_names(batch, True),
                                     "no SDF zero level set: scored as uniform points in the object's box")
            g = torch.Generator().manual_seed(b)
            lo, hi = rec.representation[b].aabb
            geo["points"][b] = (lo + (hi - lo) * torch.rand(n, 3, generator=g)).to(geo["points"])
            geo["normals"][b] = F.normalize(torch.randn(n, 3, generator=g), dim=-1).to(geo["normals"])
        geo.pop("invalid_reason", None)
        return geo

    def export_reconstruction(self, rec: Reconstruction, out_dir: Path, suffix: str = "", views=None) -> dict[str, str]:
        """Write the object's mesh (vertex colours from the colour head) in the ``export_formats``
        (default ``mesh.glb`` and ``mesh.obj``)."""
        from recon3d.render.export import export_representation
        from recon3d.render.isosurface import EmptySurfaceError

        mesh = self.reconstruction_meshes(rec, resolution=self.export_resolution)
        if mesh.num_faces[0] == 0:  # predict_step counts it as a skipped object, with the reason
            raise EmptySurfaceError(f"object {rec.object_ids[0]}: {self.empty_surface_reason}")
        verts, field = mesh.verts[0], rec.representation[0]
        with torch.no_grad():
            colors = torch.cat([field.fn(verts[None, i : i + self.eval_chunk].to(self.device))["rgb"][0]
                                for i in range(0, verts.shape[0], self.eval_chunk)])
        out = Meshes.single(verts.cpu(), mesh.faces[0].cpu(), colors.clamp(0, 1).cpu())
        return export_representation(out, Path(out_dir), self.export_formats or ("glb", "obj"), suffix=suffix)

    # ------------------------------------------------------------------ per-class evaluation (Table I)
    def _class_of(self, batch: Batch, i: int) -> str:
        code = batch.extras.get("class_code")
        if code is not None:
            k = int(code[i].argmax())
            return self.class_names[k] if k < len(self.class_names) else f"class{k}"
        if self.class_pattern is not None:
            m = self.class_pattern.search(batch.object_ids[i])
            if m:
                return m.group(1) if m.groups() else m.group(0)
        return "all"

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        for i, oid in enumerate(batch.object_ids):
            self._object_class[str(oid)] = self._class_of(batch, i)
        super().test_step(batch, batch_idx)

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._object_class = {}

    def per_class_rows(self, rows: list[dict], metrics: tuple[str, ...] = ("cd", "fscore", "nc", "iou", "psnr")) -> list[dict]:
        """Table I rows: one per class (mean over its objects), the mean over classes, the mean over objects."""
        groups: dict[str, list[dict]] = {}
        for r in rows:
            groups.setdefault(self._object_class.get(str(r["object_id"]), "all"), []).append(r)
        cols = [m for m in metrics if any(m in r for r in rows)]

        def mean(rs: list[dict], m: str) -> float:
            vals = [r[m] for r in rs if m in r and isinstance(r[m], float) and math.isfinite(r[m])]
            return float(sum(vals) / len(vals)) if vals else float("nan")

        order = [c for c in self.class_names if c in groups] + sorted(c for c in groups if c not in self.class_names)
        out = [{"class": c, "num_objects": len(groups[c]), **{m: mean(groups[c], m) for m in cols}} for c in order]
        if out:
            out.append({"class": "mean (over classes)", "num_objects": len(rows),
                        **{m: mean([{m: r[m]} for r in out[: len(order)]], m) for m in cols}})
            out.append({"class": "mean (over objects)", "num_objects": len(rows), **{m: mean(rows, m) for m in cols}})
        return out

    def on_test_epoch_end(self) -> None:
        rows = self.evaluation.per_object() if self.evaluation is not None else []  # collective: every rank
        super().on_test_epoch_end()
        if not rows or self.trainer is None or not self.trainer.is_global_zero:
            return
        table = self.per_class_rows(rows)
        path = self._out_dir() / "test" / "per_class.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        wr = csv.DictWriter(buf, fieldnames=list(table[0]), lineterminator="\n")
        wr.writeheader()
        for r in table:
            wr.writerow({k: _fmt(v) for k, v in r.items()})
        with atomic_path(path) as tmp:
            tmp.write_text(buf.getvalue(), encoding="utf-8")
        log.info("M3D per-class metrics: %s", path)


class _SliceExtras:
    """A view of a batch's ``extras`` restricted to objects ``idx`` (for per-object decoding)."""

    def __init__(self, batch: Batch, idx: slice):
        self.extras = {k: v[idx] for k, v in batch.extras.items() if k in ("cube_scale", "cube_offset")}
