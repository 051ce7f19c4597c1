"""VGGT (Wang et al. 2025) as a recon3d method: ReconViaGen's LoRA fine-tuning stage for objects
(ReconViaGen §4.2.1.1 and §5.4) and pose-free reconstruction (cameras + a point cloud).

**Fine-tuning.** Every weight of :class:`~recon3d.models.vggt.VGGTNetwork` is frozen and LoRA
adapters (:mod:`recon3d.adapters`, over peft; rank 64, alpha 128, dropout 0 — ReconViaGen §5.4)
are added to the aggregator's attention projections, the fused ``qkv`` and the output ``proj``
("the qkv mapping layer and projectors of each attention layer"). Target regex, on names inside
the network:

- default (``lora_dino: false``): ``aggregator\\.(frame|global)_blocks\\.\\d+\\.attn\\.(qkv|proj)``
  — the 24 frame + 24 global blocks, where VGGT's cross-view reasoning lives;
- ``lora_dino: true`` adds the DINOv2 patch-embedding blocks,
  ``aggregator\\.((frame|global)_blocks|patch_embed\\.blocks)\\.\\d+\\.attn\\.(qkv|proj)``.

Why the DINO blocks are left out by default: the paper says "the VGGT aggregator" without
naming them, and they are per-frame ImageNet-style features that see no other view; ReconViaGen
also conditions its generator on a separate frozen DINOv2, so adapting VGGT's copy would not
add object-specific cross-view information, and it would add 24 more adapted blocks (half again
the adapter size) — see ``shared/research/mvboost_reconviagen.md`` §4 (suggested regex, "exclude
patch_embed"). ``pattern`` overrides both.

The loss is VGGT's multi-task training loss (:mod:`recon3d.models.vggt.loss`): the camera term
(iteration weights ``0.6^(n−1−i)``, T 1 / R 1 / FoV 0.5) times ``camera_weight`` (5, upstream's
configs), the depth term (confidence-weighted, ``"grad"`` gradient term) times ``depth_weight``
and the point-map term (``"normal"`` gradient term) times ``point_weight``. The targets come from
the batch: ``inputs.cameras`` and ``inputs.depths`` (z-depth, 0 off the object; the synthetic set
and Objaverse-style renders have it), normalised as VGGT's training does — frame 0's camera is
the identity and everything is divided by the mean distance of the valid points to it
(:func:`~recon3d.models.vggt.loss.vggt_targets`). Input masks, when present, restrict the valid
pixels to the object. Image sides must be multiples of 14 (``data.input_resolution``).

Weights: ``official_weights`` loads the released ``model.pt`` / ``model.safetensors`` (+
``config.json``) strictly (:func:`~recon3d.models.vggt.pretrained.load_official_vggt`) before the
adapters are added. The Lightning checkpoint holds everything (``--ckpt_path`` resume, test,
predict, export); at the end of ``fit`` the adapters alone are written to ``<run
folder>/<adapter_file>`` (:func:`~recon3d.adapters.save_lora`), and ``adapters: PATH`` loads such
a file into a network built from ``official_weights`` — the LoRA-stage life cycle shared with
:class:`~recon3d.methods.boost.BoostModule` (:mod:`recon3d.methods._lora_stage`, which also gives both file formats).
``merge_at_inference`` folds them into the weights for test / predict.

**Reconstruction** (:meth:`VGGTModule.reconstruct`, once per batch). From the input views only
(no cameras needed): the predicted input cameras (the last camera-head iteration; FoVs clamped
to [1e-3, π − 1e-3] so that an untrained head still gives valid intrinsics), and a point cloud
— per input pixel, the predicted depth unprojected with the predicted camera (``points_from:
depth``, VGGT's more accurate route) or the point head's map (``point_map``) — kept where the
input mask is ≥ 0.5 (when there are masks) and the confidence is at or above its
``conf_quantile`` quantile within the object. Each point becomes an isotropic opaque Gaussian of
the input pixel's colour with standard deviation ``point_scale ·`` its pixel footprint (depth /
focal length), so the standard Gaussian rasteriser renders it and the ``.ply`` export writes it
(packed :class:`~recon3d.representations.Gaussians`, one count per object).

Frames: VGGT predicts in frame 0's camera frame at its own scene-normalised scale. When the batch
has input cameras (evaluation on posed data), the cloud and the cameras are mapped into the
dataset's world by the similarity that puts predicted camera 0 on the true camera 0 with the
scale that equalises the mean camera-centre distance to camera 0 (the TE normalisation of
:mod:`recon3d.metrics.pose`; with one view, the ratio of mean true to mean predicted depth where
the batch has depths, else 1). That is the alignment ReconViaGen uses to score VGGT against ground
truth (registration by camera poses); it makes novel-view and geometry metrics meaningful and
changes no pose metric (RRE, TE and Acc@θ are invariant to a similarity of the predicted set).
Without input cameras the outputs stay in VGGT's frame (``extras["frame"] == "vggt"``).

Pose metrics: ``Reconstruction.cameras`` holds the predicted input cameras, which the protocol
scores against ``batch.inputs.cameras`` (:meth:`~recon3d.methods.base.ReconModule._eval_poses`:
RRE, TE, Acc@15°/30°, ReconViaGen Table 4) in ``recon3d test`` and validation.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from jsonargparse import lazy_instance

from recon3d.adapters import LoRAConfig
from recon3d.data.batch import Batch
from recon3d.data.cameras import Cameras
from recon3d.data.rays import pixel_grid
from recon3d.errors import ConfigError, ShapeError
from recon3d.methods._lora_stage import LoRAStageMixin, check_adapter_file
from recon3d.methods.base import NonFiniteGuard, ReconModule, own_instance
from recon3d.metrics.protocol import EvaluationProtocol
from recon3d.models.vggt import VGGTNetwork
from recon3d.models.vggt.aggregator import resize_to_patch_multiple
from recon3d.models.vggt.cameras import pose_encoding_to_cameras
from recon3d.models.vggt.loss import camera_loss, regression_loss, vggt_targets
from recon3d.representations import Gaussians, RenderOutput
from recon3d.representations.reconstruction import Reconstruction
from recon3d.utils.checks import check_adamw_options, check_option

__all__ = ["VGGTModule", "LORA_TARGETS", "LORA_TARGETS_WITH_DINO", "similarity_to_world"]

log = logging.getLogger(__name__)

#: LoRA targets (names inside the network): the frame and global blocks' qkv and proj.
LORA_TARGETS = r"aggregator\.(frame|global)_blocks\.\d+\.attn\.(qkv|proj)"
#: The same plus the DINOv2 patch-embedding blocks' qkv and proj (``lora_dino: true``).
LORA_TARGETS_WITH_DINO = r"aggregator\.((frame|global)_blocks|patch_embed\.blocks)\.\d+\.attn\.(qkv|proj)"
#: Pose metrics of a camera head with no pretrained weights are flagged (not a measurement of VGGT)
#: until the module has trained this many steps (a convention: CPU-size runs of minutes are flagged).
MIN_POSE_TRAIN_STEPS = 10_000


def similarity_to_world(pred: Cameras, true: Cameras, pred_depth: torch.Tensor | None = None,
                        true_depth: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, 4, 4]`` similarities ``T = c2w_true[0] · diag(s, s, s, 1) · w2c_pred[0]`` mapping the
    predicted frame to the true world (module docstring): predicted camera 0 lands on true camera
    0; ``s`` = mean true / mean predicted camera-centre distance to camera 0 (views ≥ 2), else the
    ratio of mean depths over pixels valid in both (``[B, S, H, W]``, > 0), else 1."""
    B, S = pred.batch_shape
    pw, tw = pred.c2w.double(), true.c2w.double()
    w2c_p0 = torch.linalg.inv(pw[:, 0])
    s = torch.ones(B, dtype=torch.float64, device=pw.device)
    if S >= 2:
        cp = (w2c_p0[:, None] @ pw)[:, 1:, :3, 3].norm(dim=-1).mean(1)
        ct = (torch.linalg.inv(tw[:, 0])[:, None] @ tw)[:, 1:, :3, 3].norm(dim=-1).mean(1)
        s = torch.where(cp > 1e-12, ct / cp.clamp_min(1e-12), s)
    elif pred_depth is not None and true_depth is not None:
        both = (pred_depth > 0) & (true_depth > 0)
        n = both.flatten(1).sum(1).clamp_min(1)
        mp = (pred_depth.double() * both).flatten(1).sum(1) / n
        mt = (true_depth.double() * both).flatten(1).sum(1) / n
        s = torch.where(mp > 1e-12, mt / mp.clamp_min(1e-12), s)
    scale = torch.diag_embed(torch.stack([s, s, s, torch.ones_like(s)], -1))
    return (tw[:, 0] @ scale @ w2c_p0).float()


def _check(a: dict) -> None:
    check_option("model.rank", a["rank"], 1, integer=True)
    check_option("model.alpha", a["alpha"], 0.0, strict=True)
    check_option("model.dropout", a["dropout"], 0.0)
    if a["dropout"] >= 1:
        raise ConfigError(f"model.dropout: expected a number in [0, 1), got {a['dropout']!r}")
    for k in ("camera_weight", "depth_weight", "point_weight", "weight_trans", "weight_rot", "weight_fov", "conf_alpha",
              "point_scale"):
        check_option(f"model.{k}", a[k], 0.0)
    check_option("model.gamma", a["gamma"], 0.0, strict=True)
    check_adamw_options(a["lr"], a["weight_decay"], a["betas"], a["warmup_steps"])
    check_option("model.min_valid_points", a["min_valid_points"], 0, integer=True)
    check_option("model.conf_quantile", a["conf_quantile"], 0.0)
    if a["conf_quantile"] >= 1:
        raise ConfigError(f"model.conf_quantile: expected a number in [0, 1), got {a['conf_quantile']!r}")
    if a["valid_range"] is not None and not 0 < a["valid_range"] <= 1:
        raise ConfigError(f"model.valid_range: expected a quantile in (0, 1] or null, got {a['valid_range']!r}")
    if a["points_from"] not in ("depth", "point_map"):
        raise ConfigError(f"model.points_from: expected 'depth' or 'point_map', got {a['points_from']!r}")
    check_adapter_file(a["adapter_file"])


class VGGTModule(LoRAStageMixin, ReconModule):
    """VGGT with ReconViaGen's LoRA fine-tuning stage (module docstring).

    The adapters' life cycle and file formats are :class:`~recon3d.methods._lora_stage.LoRAStageMixin`'s
    (owner and adapted part: the network ``net``); here: the targets, VGGT's loss and the
    point-cloud reconstruction.

    Args:
        network: the VGGT network (``config: paper`` = VGGT-1B, ``tiny`` for CPU tests); its
            camera head is required, depth / point heads are used when built.
        official_weights: the released ``model.pt`` / ``model.safetensors`` (file or folder),
            loaded strictly before the adapters are added (None: the network as initialised).
        lora_dino: also adapt the DINOv2 patch-embedding blocks (default off; module docstring).
        pattern: a regex (``re.fullmatch`` on names inside the network) replacing the default targets.
        rank, alpha, dropout: LoRA (ReconViaGen §5.4: 64, 128, 0).
        camera_weight, depth_weight, point_weight: task weights (upstream: 5, 1, 1; 0 drops a task).
        gamma: camera-iteration decay (0.6). weight_trans, weight_rot, weight_fov: 1, 1, 0.5.
        conf_alpha: weight of ``−log c`` (0.2).
        valid_range: quantile filter of the dense terms (0.98; null: off).
        min_valid_points: fewer valid pixels (per object's frame 0 for the camera term, per batch
            for the dense terms) give a zero term, as upstream (100).
        lr, weight_decay, betas, warmup_steps: AdamW over the adapters with linear warm-up and
            cosine decay (upstream VGGT fine-tuning: lr 1e-4, weight decay 0.05; ReconViaGen's VGGT
            learning rate is not legible in the paper).
        adapters: an adapter file loaded at construction; adapter_file: the one written at the
            end of ``fit`` (None: not written); merge_at_inference: merge before test / predict.
        points_from: ``depth`` (depth head + predicted cameras) or ``point_map`` (point head).
        conf_quantile: per object, keep points whose confidence is at or above this quantile (0: all).
        point_scale: Gaussian standard deviation in pixel footprints (0.5: with the rasteriser's 0.3 px² low-pass a splat covers its pixel).
        render_backend: ``auto | torch | gsplat`` for the Gaussian rasteriser.
        evaluation, init_weights, init_weights_ignore, nonfinite, vis_views, validation_mode, eval_seed:
            see :class:`~recon3d.methods.base.ReconModule`.
    """

    RUNTIME_OPTIONS = ReconModule.RUNTIME_OPTIONS | {"official_weights", "adapters", "merge_at_inference", "points_from",
                                                     "conf_quantile", "point_scale", "render_backend"}
    EXPORT_REPRESENTATION = Gaussians
    LORA_WEIGHTS = "VGGT"  # "the adapters were merged into the VGGT weights"
    LORA_LOG_NAME = "VGGT LoRA"

    def __init__(
        self,
        network: VGGTNetwork = lazy_instance(VGGTNetwork, config="paper"),
        official_weights: str | None = None,
        lora_dino: bool = False,
        pattern: str | None = None,
        rank: int = 64,
        alpha: float = 128.0,
        dropout: float = 0.0,
        camera_weight: float = 5.0,
        depth_weight: float = 1.0,
        point_weight: float = 1.0,
        gamma: float = 0.6,
        weight_trans: float = 1.0,
        weight_rot: float = 1.0,
        weight_fov: float = 0.5,
        conf_alpha: float = 0.2,
        valid_range: float | None = 0.98,
        min_valid_points: int = 100,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        adapters: str | None = None,
        adapter_file: str | None = "adapters.safetensors",
        merge_at_inference: bool = False,
        points_from: Literal["depth", "point_map"] = "depth",
        conf_quantile: float = 0.0,
        point_scale: float = 0.5,
        render_backend: str = "auto",
        evaluation: EvaluationProtocol | None = None,
        init_weights: str | None = None,
        nonfinite: NonFiniteGuard | None = None,
        vis_views: int = 4,
        init_weights_ignore: list[str] | None = None,
        validation_mode: Literal["render", "loss"] = "render",
        eval_seed: int = 0,
    ):
        super().__init__(evaluation=evaluation, init_weights=init_weights, nonfinite=nonfinite, vis_views=vis_views,
                         init_weights_ignore=init_weights_ignore, validation_mode=validation_mode, eval_seed=eval_seed)
        _check(locals())
        self.save_hyperparameters()  # the network as its config (recon3d fit) or left out, never pickled
        net = own_instance(network)
        if not isinstance(net, VGGTNetwork):
            raise ConfigError(f"model.network: expected a recon3d.models.vggt.VGGTNetwork, got {type(net).__name__}")
        if net.camera_head is None:
            raise ConfigError("model.network: VGGTModule needs the camera head (heads must include 'camera')")
        if points_from == "point_map" and net.point_head is None or points_from == "depth" and net.depth_head is None:
            head = "point" if points_from == "point_map" else "depth"
            raise ConfigError(f"model.points_from: {points_from!r} needs the network's {head} head (heads: {list(net.heads)})")
        if official_weights is not None:
            from recon3d.models.vggt.pretrained import load_official_vggt

            load_official_vggt(official_weights, net)
            log.info("loaded the released VGGT weights from %s", official_weights)
        self.net = net
        self._install_lora(LoRAConfig(target_modules=pattern or (LORA_TARGETS_WITH_DINO if lora_dino else LORA_TARGETS),
                                      r=rank, alpha=alpha, dropout=dropout), "VGGTNetwork", adapters)
        self.camera_weight, self.depth_weight, self.point_weight = camera_weight, depth_weight, point_weight
        self.gamma, self.weight_trans, self.weight_rot, self.weight_fov = gamma, weight_trans, weight_rot, weight_fov
        self.conf_alpha, self.valid_range, self.min_valid_points = conf_alpha, valid_range, min_valid_points
        self.lr, self.weight_decay, self.betas, self.warmup_steps = lr, weight_decay, tuple(betas), warmup_steps
        self.adapter_file, self.merge_at_inference = adapter_file, merge_at_inference
        self.points_from, self.conf_quantile, self.point_scale = points_from, conf_quantile, point_scale
        self.render_backend = render_backend
        self._rasterizer = None

    # ------------------------------------------------------------------ adapters (LoRAStageMixin)
    @property
    def lora_owner(self) -> VGGTNetwork:
        """The VGGT network: frozen, holds the adapters; :meth:`merge_adapters` returns it."""
        return self.net

    # ------------------------------------------------------------------ training
    def _valid(self, batch: Batch) -> torch.Tensor:
        """``[B, S, H, W]`` pixels with ground truth: depth > 0, inside the mask when there is one."""
        valid = batch.inputs.depths[:, :, 0] > 0
        if batch.inputs.masks is not None:
            valid = valid & (batch.inputs.masks[:, :, 0] >= 0.5)
        return valid

    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """VGGT's multi-task loss on the input views (module docstring). Returns named scalars
        with the total under ``"loss"``: ``camera, T, R, FoV`` and ``{depth,point}_{conf,reg,grad}``."""
        self._check_trainable()
        batch.require("inputs.cameras", "inputs.depths", who="VGGTModule (training)")
        images = batch.inputs.images
        p = self.net.cfg.patch_size
        if images.shape[-1] % p or images.shape[-2] % p:
            raise ShapeError(f"inputs.images: VGGT trains on sides that are multiples of {p}, got {images.shape[-2]}x{images.shape[-1]}; "
                             f"set data.input_resolution to one (e.g. {max(p, round(images.shape[-1] / p) * p)})")
        out = self.net(images)
        tg = vggt_targets(batch.inputs.cameras, batch.inputs.depths, self._valid(batch))
        valid = tg["valid"]
        frame0_ok = valid[:, 0].flatten(1).sum(1) > self.min_valid_points
        # the losses in float32 also under bf16 autocast (upstream computes its normals outside autocast)
        terms = camera_loss([p.float() for p in out["pose_enc_list"]], tg["pose_enc"], frame0_ok, self.gamma, self.weight_trans,
                            self.weight_rot, self.weight_fov)
        loss = self.camera_weight * terms["camera"]
        enough = int(valid.sum()) >= self.min_valid_points
        for task, key, conf_key, gt, grad, weight in (
            ("depth", "depth", "depth_conf", tg["depth"], "grad", self.depth_weight),
            ("point", "world_points", "world_points_conf", tg["points"], "normal", self.point_weight),
        ):
            if key not in out or weight == 0:
                continue
            if enough:
                with torch.autocast(device_type=images.device.type, enabled=False):
                    t = regression_loss(out[key].float(), gt, valid, out[conf_key].float(), grad, 1.0, self.conf_alpha, self.valid_range)
            else:  # upstream: too few valid pixels, a zero that keeps the graph
                zero = (out[key] * 0).mean()
                t = {"conf": zero, "reg": zero, "grad": zero}
            terms.update({f"{task}_{k}": v for k, v in t.items()})
            loss = loss + weight * (t["conf"] + t["reg"] + t["grad"])
        terms["loss"] = loss
        return terms

    # configure_optimizers, lr_factor, on_train_end, on_test_start / on_predict_start: LoRAStageMixin's

    # ------------------------------------------------------------------ reconstruction
    def predict_views(self, images: torch.Tensor) -> dict:
        """The network's outputs for ``images [B, S, 3, H, W]`` plus ``cameras`` (predicted,
        :class:`Cameras` ``[B, S]`` at the input size, VGGT's frame) and ``images`` (resized to a
        multiple of 14 when the network has ``resize``)."""
        H0, W0 = images.shape[-2:]
        out = self.net(images)  # with resize=True the network resizes (and warns once per size)
        if tuple(out.get("image_size", (H0, W0))) != (H0, W0):
            images = resize_to_patch_multiple(images, self.net.cfg.patch_size)  # the colours at the outputs' size
        enc = out["pose_enc"].float()
        # an untrained head may give FoV 0 after its ReLU: clamp so that the intrinsics exist
        enc = torch.cat([enc[..., :7], enc[..., 7:].clamp(1e-3, math.pi - 1e-3)], -1)
        with torch.autocast(device_type=images.device.type, enabled=False):
            out["cameras"] = pose_encoding_to_cameras(enc, int(H0), int(W0))
        out["images"] = images
        return out

    def reconstruct(self, batch: Batch) -> Reconstruction:
        """Predicted input cameras and a Gaussian point cloud per object (module docstring).

        ``extras``: ``frame`` (``"world"`` or ``"vggt"``), ``vggt_to_world`` (``[B, 4, 4]`` or
        None), ``depth`` ``[B, S, H, W]`` (z-depth along the predicted cameras, in the output
        frame's units) and ``depth_conf`` ``[B, S, H, W]`` (the confidence of the points' head)."""
        images = batch.inputs.images
        out = self.predict_views(images)
        # the geometry in float32 also under bf16 autocast (frames, unprojection, alignment)
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self._reconstruction(batch, out)

    def _reconstruction(self, batch: Batch, out: dict) -> Reconstruction:
        images = batch.inputs.images
        B, S, _, H, W = out["images"].shape
        cams = out["cameras"].resized(W, H) if (H, W) != tuple(images.shape[-2:]) else out["cameras"]
        if self.points_from == "depth":
            z = out["depth"][..., 0].float()
            pts = cams.unproject(pixel_grid(W, H, device=z.device).reshape(1, 1, H * W, 2).expand(B, S, -1, -1), z.reshape(B, S, H * W))
            conf = out["depth_conf"]
        else:
            pts = out["world_points"].float().reshape(B, S, H * W, 3)
            conf = out["world_points_conf"]
            z = cams.world_to_camera(pts)[..., 2].reshape(B, S, H, W)
        footprint = z.reshape(B, S, H * W) / cams.K[..., 0, 0, None].float()
        keep = torch.isfinite(pts).all(-1) & (z.reshape(B, S, H * W) > 0) & torch.isfinite(footprint)
        if batch.inputs.masks is not None:
            masks = batch.inputs.masks
            if masks.shape[-2:] != (H, W):
                masks = resize_to_patch_multiple(masks.expand(-1, -1, 3, -1, -1), self.net.cfg.patch_size)[:, :, :1]
            keep &= masks[:, :, 0].reshape(B, S, H * W) >= 0.5
        conf = conf.float().reshape(B, S * H * W)
        keep = keep.reshape(B, S * H * W)
        if self.conf_quantile > 0:
            for b in range(B):
                if keep[b].any():
                    keep[b] &= conf[b] >= torch.quantile(conf[b][keep[b]], self.conf_quantile)
        pts, footprint = pts.reshape(B, S * H * W, 3), footprint.reshape(B, S * H * W)
        colors = out["images"].float().permute(0, 1, 3, 4, 2).reshape(B, S * H * W, 3).clamp(0, 1)
        pred_cams, to_world, frame = out["cameras"], None, "vggt"
        depth_out = z.reshape(B, S, H, W)
        true = batch.inputs.cameras
        if true is not None:
            true_depth = batch.inputs.depths[:, :, 0] if batch.inputs.depths is not None and (H, W) == tuple(images.shape[-2:]) else None
            pred_depth = z.reshape(B, S, H, W) if true_depth is not None else None
            to_world = similarity_to_world(out["cameras"], true, pred_depth, true_depth)
            s = torch.linalg.det(to_world[:, :3, :3].double()).abs().pow(1 / 3).float()
            pts = pts @ to_world[:, :3, :3].transpose(-1, -2) + to_world[:, None, :3, 3]
            footprint = footprint * s[:, None]
            depth_out = depth_out * s[:, None, None, None]
            c2w = to_world[:, None].double() @ out["cameras"].c2w.double()
            c2w[..., :3, :3] = c2w[..., :3, :3] / s.double()[:, None, None, None]  # rotation part back to orthonormal
            pred_cams = Cameras(c2w.float(), out["cameras"].K, out["cameras"].width, out["cameras"].height)
            frame = "world"
        counts = keep.sum(1).cpu()
        sel = keep.reshape(-1)
        n = int(sel.sum())
        means = pts.reshape(-1, 3)[sel]
        sigma = (self.point_scale * footprint.reshape(-1)[sel]).clamp_min(1e-6)
        gaussians = Gaussians(means, torch.tensor([1.0, 0.0, 0.0, 0.0], device=means.device).expand(n, 4).contiguous(),
                              sigma[:, None].expand(n, 3).contiguous(), torch.ones(n, device=means.device),
                              colors.reshape(-1, 3)[sel], counts=counts)
        extras = {"frame": frame, "vggt_to_world": to_world, "depth": depth_out, "depth_conf": conf.reshape(B, S, H, W),
                  **self.camera_head_status()}
        return Reconstruction(list(batch.object_ids), gaussians, extras=extras, cameras=pred_cams)

    def rasterizer(self, device: torch.device | None = None):
        kind = torch.device(device or self.device).type
        if self._rasterizer is None or self._rasterizer[0] != kind:
            from recon3d.render.gaussians import GaussianRasterizer

            self._rasterizer = (kind, GaussianRasterizer(self.render_backend, device=kind, background="white"))
        return self._rasterizer[1]

    def render_reconstruction(self, rec: Reconstruction, cameras: Cameras) -> RenderOutput:
        """The point-cloud Gaussians at ``cameras`` on white, in float32."""
        from recon3d.render import render

        g = rec.representation
        with torch.autocast(device_type=cameras.c2w.device.type, enabled=False):
            return render(g.to(torch.float32), cameras.to(torch.float32), "white", renderer=self.rasterizer(g.means.device))

    def reconstruction_geometry(self, rec: Reconstruction, batch: Batch) -> dict[str, torch.Tensor] | None:
        """The cloud's points (drawn with replacement to the ground truth's count, per-object
        seeds) for the geometry metrics; objects without points are invalid. No normals."""
        from recon3d.methods.base import _num_points
        from recon3d.representations.reconstruction import object_seeds

        g = rec.representation
        n = _num_points(batch.geometry.surface_points, 4096)
        pts, valid = [], []
        for b, seed in enumerate(object_seeds(rec.object_ids, self.eval_seed)):
            m = g[b].means
            if m.shape[0] == 0:
                pts.append(torch.zeros(n, 3, device=m.device))
                valid.append(False)
                continue
            idx = torch.randint(0, m.shape[0], (n,), generator=torch.Generator().manual_seed(seed))
            pts.append(m[idx.to(m.device)])
            valid.append(True)
        return {"points": torch.stack(pts), "valid": torch.tensor(valid),
                "invalid_reason": "no point passed the mask / confidence filter"}

    # ------------------------------------------------------------------ where the cameras come from
    def camera_head_status(self) -> dict:
        """What the predicted cameras rest on, for the pose metrics: ``pretrained_camera_head``
        (the camera head's weights were loaded from a file: ``official_weights``, or the
        ``init_weights`` / checkpoint that carried them), ``camera_weights`` (that file or None),
        ``camera_train_steps`` (optimizer steps this module has trained, checkpoints included) and
        ``pose_caveat``: None, or why RRE / TE / Acc are not a measurement of VGGT -- no pretrained
        weights and fewer than :data:`MIN_POSE_TRAIN_STEPS` steps (the protocol flags them then)."""
        src = getattr(self, "_camera_weights", None) or self.hparams.get("official_weights")
        steps = max(getattr(self, "_camera_steps_loaded", 0), getattr(self, "_camera_init_steps", 0) + int(self.global_step))
        caveat = None
        if src is None and steps < MIN_POSE_TRAIN_STEPS:
            caveat = (f"camera head without pretrained weights (no model.official_weights), {steps} training steps "
                      f"(< {MIN_POSE_TRAIN_STEPS}): not a measurement of VGGT's poses")
        return {"pretrained_camera_head": src is not None, "camera_weights": None if src is None else str(src),
                "camera_train_steps": steps, "pose_caveat": caveat}

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if getattr(self, "_init_weights_loaded", False) and not getattr(self, "_camera_init_read", False):
            self._camera_weights, self._camera_init_steps = _camera_record(self.init_weights)
            self._camera_init_read = True

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        st = self.camera_head_status()
        checkpoint["recon3d_camera_head"] = {"weights": st["camera_weights"], "train_steps": st["camera_train_steps"]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        rec = checkpoint.get("recon3d_camera_head")
        if isinstance(rec, dict):
            if rec.get("weights"):
                self._camera_weights = rec["weights"]
            steps = int(rec.get("train_steps") or 0)
        else:  # a checkpoint from before the record: its steps, its config's official_weights (the hparams)
            steps = int(checkpoint.get("global_step") or 0)
        self._camera_steps_loaded = max(getattr(self, "_camera_steps_loaded", 0), steps)


def _camera_record(path: str) -> tuple[str | None, int]:
    """``(weights file, steps)`` that a weights-only initialisation from ``path`` gives the camera
    head: a VGGTModule checkpoint's ``recon3d_camera_head`` record; an older Lightning checkpoint's
    ``official_weights`` hyper-parameter and ``global_step``; any other file (a bare state dict,
    ``.safetensors``): the file itself, 0 steps."""
    from pathlib import Path

    p = Path(path)
    if p.suffix == ".safetensors":
        return str(p), 0
    try:  # mmap: the tensors are not read
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a zip archive: the full load (it already succeeded once)
        from recon3d.utils.checkpoint import load_state_dict_file

        obj = load_state_dict_file(p)
    if isinstance(obj, dict) and isinstance(obj.get("recon3d_camera_head"), dict):
        rec = obj["recon3d_camera_head"]
        return rec.get("weights"), int(rec.get("train_steps") or 0)
    if isinstance(obj, dict) and isinstance(obj.get("hyper_parameters"), dict):
        return obj["hyper_parameters"].get("official_weights"), int(obj.get("global_step") or 0)
    return str(p), 0
