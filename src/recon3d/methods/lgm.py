"""LGM (Tang et al. 2024, "LGM: Large Multi-View Gaussian Model for High-Resolution 3D Content
Creation") as a recon3d method.

The network (:class:`~recon3d.models.lgm.LGMNetwork`, plain ``nn.Module``) turns ``V`` posed
input views into one 3D Gaussian per output pixel and view (``big``: 4 × 128² = 65,536). This
module trains it as the official ``main.py`` / ``core/models.py`` do (3DTopia/LGM @ fe8d12c):

- **inputs**: the ``V`` input views, in ``[0, 1]``, with their cameras; the network builds its 9
  channels (ImageNet-normalised RGB ‖ Plücker rays) in its own camera frame, in which view 0 sits
  at ``[0, 0, 1.5]`` with the identity rotation (the network's camera normalisation);
- **augmentation** (training only, ``augment``): grid distortion (probability 0.5) of the images
  and orbit jitter (probability 0.5) of the cameras of input views 1…V−1
  (:mod:`recon3d.models.lgm.augment`); the supervision is never augmented;
- **render**: the Gaussians at the target cameras through recon3d's Gaussian rasteriser
  (:func:`recon3d.render.render`; gsplat on CUDA, the pure-torch reference on CPU), white
  background, in float32 also under bf16 autocast (the official renderer casts to float too);
- **loss**: ``MSE(rgb, target on white) + λ_mask · MSE(alpha, mask) + λ_lpips · LPIPS-VGG`` with
  LPIPS on images resized to ``lpips_resolution`` (LGM: 256) and mapped to ``[−1, 1]`` (inside
  :class:`~recon3d.metrics.lpips.LPIPSNet`); LGM: ``λ_mask = λ_lpips = 1``. Targets composited
  on another background than white are re-composited on white with their masks first;
- **optimiser**: AdamW (lr 4e-4, weight decay 0.05, betas (0.9, 0.95)) with PyTorch's
  ``OneCycleLR`` schedule (cosine warm-up from lr/25 over ``warmup_steps`` = 3,000, cosine decay
  to lr/25/1e4 at the last step), written as the pure function :meth:`LGMModule.lr_factor` of the
  step (resume-exact, :meth:`ReconModule.lr_factor`). Gradient clipping (1.0) and bf16 are trainer
  options (``gradient_clip_val``, ``precision: bf16-mixed``) in the configs.

Differences from the official code, on purpose:

- the official renderer clamps rendered colours to ``[0, 1]``; recon3d's white-background render
  of colours in ``[0, 1]`` is already inside it (no clamp, so no dead gradient at the ends);
- LPIPS resizes with antialiasing (:class:`~recon3d.metrics.lpips.LPIPSLoss`); upstream resizes
  512 → 256 bilinearly without it;
- targets: the data module chooses them; the paper's setting (8 views, the 4 inputs among them)
  is ``data.num_input_views: 4, num_target_views: 4, supervise_inputs: true`` (configs/lgm.yaml).
- frame: upstream's data loader moves view 0 to ``[0, 0, 1.5]`` rigidly (its renders are at
  distance 1.5); here each object's world is also scaled so that view 0 is at 1.5
  (``normalize_scale``, the identity for LGM's renders) and the Gaussians are mapped back to the
  dataset's world, so they render at the dataset's own cameras;
- near / far: LGM's projection (0.5, 2.5 in its frame) only maps depth there (its rasteriser
  culls by a fixed z > 0.2); recon3d's rasteriser renders in the world frame and keeps every
  Gaussian in front of its own near plane (0.01 world units).

Geometry metrics use the Gaussian centres, drawn in proportion to opacity
(:meth:`LGMModule.reconstruction_geometry`). Exports are the 3DGS ``gaussians.ply`` of each object (:mod:`recon3d.render.gaussians.ply`),
without the Gaussians whose opacity is below ``export_min_opacity`` (LGM's ``save_ply``: 0.005).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from jsonargparse import lazy_instance

from recon3d.data.batch import Batch, Views
from recon3d.data.cameras import Cameras
from recon3d.errors import ConfigError, DataError, ShapeError
from recon3d.methods.base import NonFiniteGuard, ReconModule, own_instance
from recon3d.metrics.protocol import EvaluationProtocol
from recon3d.models.lgm import (
    LGM_CAM_RADIUS,
    LGMNetwork,
    activate_gaussians,
    lgm_input_features,
    normalize_cameras,
    transform_gaussians,
)
from recon3d.models.lgm.augment import augment_input_views
from recon3d.models.refiners import Refiner
from recon3d.representations import Gaussians, RenderOutput
from recon3d.representations.reconstruction import Reconstruction
from recon3d.utils.checks import check_adamw_options, check_option

__all__ = ["LGMModule", "one_cycle_lr_factor"]


def one_cycle_lr_factor(step: int, total_steps: int, warmup_steps: int, div_factor: float = 25.0,
                        final_div_factor: float = 1e4) -> float:
    """The learning rate of PyTorch's ``OneCycleLR`` (two phases, cosine annealing) at ``step``,
    as a fraction of ``max_lr``.

    ``OneCycleLR(total_steps=total_steps, pct_start=warmup_steps / total_steps)`` as LGM's
    ``main.py`` builds it: cosine from ``1 / div_factor`` up to 1 at step ``warmup_steps − 1``,
    then cosine down to ``1 / (div_factor · final_div_factor)`` at step ``total_steps − 1``.
    ``warmup_steps`` is clamped to ``[1, total_steps − 1]`` (torch would refuse a warm-up as long as
    the run; a CPU run may be shorter than LGM's 3,000 warm-up steps); steps past the end keep the
    final rate.
    """
    import math

    total = max(2, int(total_steps))
    warm = min(max(1, int(warmup_steps)), total - 1)
    lo, hi, end = 1.0 / div_factor, 1.0, 1.0 / (div_factor * final_div_factor)
    step = min(max(0, int(step)), total - 1)

    def cos(a: float, b: float, pct: float) -> float:
        return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1)

    # torch: the warm-up phase ends at float(pct_start * total) - 1, the decay at total - 1
    e1 = float(warm) - 1
    if step <= e1:
        return cos(lo, hi, step / e1) if e1 > 0 else hi
    return cos(hi, end, (step - e1) / (total - 1 - e1))


def _check_options(a: dict) -> None:
    check_adamw_options(a["lr"], a["weight_decay"], a["betas"], a["warmup_steps"])
    check_option("model.lambda_mask", a["lambda_mask"], 0.0)
    check_option("model.lambda_lpips", a["lambda_lpips"], 0.0)
    check_option("model.lpips_resolution", a["lpips_resolution"], 32, integer=True)
    check_option("model.export_min_opacity", a["export_min_opacity"], 0.0)
    for k in ("prob_grid_distortion", "prob_camera_jitter", "grid_strength", "jitter_strength"):
        v = a[k]
        check_option(f"model.{k}", v, 0.0)
        if v > 1:
            raise ConfigError(f"model.{k}: expected a number in [0, 1], got {v!r}")


class LGMModule(ReconModule):
    """LGM: Gaussians from posed multi-view images (module docstring).

    Args:
        network: the LGM U-Net and Gaussian head (``preset`` big / small / tiny; sizes from the
            config); its ``num_views`` is the number of input views the batches must have.
        lr: AdamW peak learning rate (LGM: 4e-4).
        weight_decay: AdamW weight decay (LGM: 0.05).
        betas: AdamW betas (LGM: (0.9, 0.95)).
        warmup_steps: the one-cycle schedule's warm-up (LGM: 3,000 steps; see
            :func:`one_cycle_lr_factor`).
        lambda_mask: weight of the alpha-vs-mask MSE (LGM: 1).
        lambda_lpips: weight of LPIPS-VGG (LGM: 1). Needs the pretrained LPIPS files
            (``lpips_weights_dir``, :mod:`recon3d.metrics.lpips`); without them construction stops
            with one line naming the files. 0 switches the term off.
        lpips_resolution: LPIPS compares images resized to this square size (LGM: 256).
        lpips_weights_dir: folder with ``vgg16-397923af.pth`` and the lpips ``vgg.pth`` heads.
        augment: apply LGM's input augmentation while training (below).
        prob_grid_distortion: per-object probability of warping input views 1…V−1 (LGM: 0.5).
        prob_camera_jitter: per-object probability of jittering their cameras (LGM: 0.5).
        grid_strength: grid-distortion strength (LGM: 0.5).
        jitter_strength: camera-jitter strength, a fraction of π (LGM: 0.1).
        normalize_scale: scale each object's world so its input view 0 sits at LGM's distance 1.5
            (a similarity, undone on the Gaussians); off: the rigid normalisation of LGM's data
            loader alone, right only for data rendered at distance 1.5 (LGM's own renders, where
            both agree). recon3d's synthetic cameras sit at 2.6-3.2 from objects in
            ``[-1, 1]^3``: without the scale the object would leave LGM's ``[-1, 1]^3`` box.
        render_backend: ``auto | torch | gsplat`` for the Gaussian rasteriser.
        export_min_opacity: Gaussians below this opacity are left out of exported ``.ply`` files
            (LGM: 0.005; 0 keeps all).
        refine: a test-time refiner applied per object in ``predict`` / ``export`` (None: off), e.g.
            MVBoost's input-view optimisation
            (:class:`~recon3d.models.refiners.input_view.InputViewRefiner`); its refined Gaussians
            are exported beside the feed-forward ones (``gaussians_<name>.ply``).
        evaluation, init_weights, init_weights_ignore, nonfinite, vis_views, validation_mode, eval_seed:
            see :class:`~recon3d.methods.base.ReconModule`.

    Run-time options (the command line wins over a checkpoint): the rendering backend, the export
    opacity threshold, the LPIPS weight folder and the test-time refiner.
    """

    RUNTIME_OPTIONS = ReconModule.RUNTIME_OPTIONS | {"render_backend", "export_min_opacity", "lpips_weights_dir", "refine"}
    EXPORT_REPRESENTATION = Gaussians

    def __init__(
        self,
        network: LGMNetwork = lazy_instance(LGMNetwork, preset="big"),
        lr: float = 4e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 3000,
        lambda_mask: float = 1.0,
        lambda_lpips: float = 1.0,
        lpips_resolution: int = 256,
        lpips_weights_dir: str | None = None,
        augment: bool = True,
        prob_grid_distortion: float = 0.5,
        prob_camera_jitter: float = 0.5,
        grid_strength: float = 0.5,
        jitter_strength: float = 0.1,
        normalize_scale: bool = True,
        render_backend: str = "auto",
        export_min_opacity: float = 0.005,
        refine: Refiner | None = None,
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
        _check_options(locals())
        self.save_hyperparameters()  # the network as its config (recon3d fit) or left out, never pickled
        self.net = own_instance(network)
        self.lr, self.weight_decay, self.betas, self.warmup_steps = lr, weight_decay, tuple(betas), warmup_steps
        self.lambda_mask, self.lambda_lpips, self.lpips_resolution = lambda_mask, lambda_lpips, lpips_resolution
        self.lpips_weights_dir = lpips_weights_dir
        self.augment = augment
        self.prob_grid_distortion, self.prob_camera_jitter = prob_grid_distortion, prob_camera_jitter
        self.grid_strength, self.jitter_strength = grid_strength, jitter_strength
        self.normalize_scale = normalize_scale
        self.render_backend = render_backend
        self.export_min_opacity = export_min_opacity
        self.refiners = [refine] if refine is not None else []
        self.lpips = None
        if lambda_lpips > 0:
            from recon3d.metrics.lpips import LPIPSLoss

            # Refuses with one line naming the files when the pretrained weights are absent: LPIPS
            # on random weights would train towards a meaningless target.
            self.lpips = LPIPSLoss("vgg", pretrained=True, weights_dir=lpips_weights_dir, resize=lpips_resolution)
        self._rasterizer = None

    # ------------------------------------------------------------------ network
    @property
    def num_views(self) -> int:
        """Input views per object the network takes."""
        return int(self.net.num_views)

    def _check_inputs(self, batch: Batch, who: str = "LGM") -> None:
        batch.require("inputs.cameras", who=who)  # the Plücker-ray input channels
        V = batch.inputs.images.shape[1]
        if V != self.num_views:
            raise ShapeError(
                f"inputs.images: {who} takes {self.num_views} input views per object (the network's num_views), got {V}; "
                f"set data.num_input_views: {self.num_views} or model.network.init_args.num_views: {V}"
            )

    def gaussians(self, views: Views) -> Gaussians:
        """Gaussians ``(B, V·h·w)`` in the dataset's world frame from the input ``views``
        (``images (B, V, 3, H, W)`` in ``[0, 1]``, ``cameras (B, V)``).

        The cameras are first normalised (:func:`~recon3d.models.lgm.normalize_cameras`): view 0
        becomes LGM's canonical camera at ``[0, 0, 1.5]`` (scaled there with
        ``normalize_scale``); the network predicts in that frame and the Gaussians are mapped
        back to the world with the inverse similarity (:func:`~recon3d.models.lgm.transform_gaussians`),
        so every renderer and metric sees them in the dataset's frame."""
        device = views.images.device.type
        # Frames in float32 even under bf16 autocast: bf16 matmuls would break the rotations'
        # orthonormality check and move the Gaussians by ~0.4% of the scene.
        # The 9 input channels too: under autocast the ray matmul gives bf16 directions beside
        # float32 origins, which torch.linalg.cross refuses (and the rays would lose precision).
        with torch.autocast(device_type=device, enabled=False):
            canon, world_to_canon = normalize_cameras(views.cameras, LGM_CAM_RADIUS, reference=0, rescale=self.normalize_scale)
            to_world = torch.linalg.inv(world_to_canon.double()).to(world_to_canon.dtype)
            features = lgm_input_features(views.images.float(), canon)
        raw = self.net.raw_from_features(features)  # the U-Net (and 1x1 conv) in the trainer's precision
        with torch.autocast(device_type=device, enabled=False):
            return transform_gaussians(activate_gaussians(raw.float()), to_world)

    # ------------------------------------------------------------------ rendering
    def rasterizer(self, device: torch.device | None = None):
        """The Gaussian rasteriser for ``device`` (default the module's), built once per device
        type (``auto`` picks gsplat for CUDA tensors, the torch reference otherwise)."""
        kind = torch.device(device or self.device).type
        if self._rasterizer is None or self._rasterizer[0] != kind:
            from recon3d.render.gaussians import GaussianRasterizer

            self._rasterizer = (kind, GaussianRasterizer(self.render_backend, device=kind, background="white"))
        return self._rasterizer[1]

    def render_gaussians(self, gaussians: Gaussians, cameras: Cameras) -> RenderOutput:
        """Render ``gaussians`` into ``cameras (B, V)`` on white, in float32 (also under autocast)."""
        from recon3d.render import render

        with torch.autocast(device_type=cameras.c2w.device.type, enabled=False):
            return render(gaussians.to(torch.float32), cameras.to(torch.float32), "white",
                          renderer=self.rasterizer(gaussians.means.device))

    def render_reconstruction(self, rec: Reconstruction, cameras: Cameras) -> RenderOutput:
        return self.render_gaussians(rec.representation, cameras)

    # ------------------------------------------------------------------ reconstruct once
    def reconstruct(self, batch: Batch) -> Reconstruction:
        """The Gaussians of every object (dense, ``N = V·h·w``), in the dataset's world frame."""
        self._check_inputs(batch)
        return Reconstruction(list(batch.object_ids), self.gaussians(batch.inputs))

    # ------------------------------------------------------------------ losses
    def _augmented_inputs(self, views: Views) -> Views:
        if not (self.training and self.augment and (self.prob_grid_distortion > 0 or self.prob_camera_jitter > 0)):
            return views
        cams = views.cameras
        images, c2w = augment_input_views(views.images, cams.c2w, self.prob_grid_distortion, self.prob_camera_jitter,
                                          self.grid_strength, self.jitter_strength)
        # The jitter keeps rotations orthonormal to float precision: no re-validation needed.
        jittered = Cameras._trusted(c2w, cams.K, cams.width, cams.height, cams.projection)
        return Views(images=images, cameras=jittered, masks=views.masks, depths=views.depths, normals=views.normals)

    @staticmethod
    def _on_white(images: torch.Tensor, masks: torch.Tensor | None, background: torch.Tensor | None) -> torch.Tensor:
        """Targets re-composited on white: ``img + (1 − bg)(1 − mask)`` for images composited as
        ``rgb·mask + bg·(1 − mask)`` (the data module's rule); unchanged on a white background."""
        if background is None or masks is None:
            return images
        bg = background.to(images).view(-1, 1, 3, 1, 1)
        if torch.all(bg == 1):
            return images
        return images + (1 - bg) * (1 - masks)

    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        self._check_inputs(batch)
        batch.require("targets.cameras", who="LGM")
        if self.lambda_mask > 0:
            batch.require("targets.masks", who="LGM's alpha loss (model.lambda_mask > 0)")
        gs = self.gaussians(self._augmented_inputs(batch.inputs))
        tg = batch.targets
        out = self.render_gaussians(gs, tg.cameras)
        if tg.masks is None and batch.background is not None and not bool(torch.all(batch.background == 1)):
            raise DataError(f"batch of {batch.object_ids[:3]}", "LGM renders and supervises on white, but the targets are "
                            "composited on another background and have no masks to re-composite them; set data.background: white")
        target = self._on_white(tg.images, tg.masks, batch.background)
        terms = {"rgb": F.mse_loss(out.rgb, target)}
        loss = terms["rgb"]
        if self.lambda_mask > 0:
            terms["mask"] = F.mse_loss(out.alpha, tg.masks.to(out.alpha))
            loss = loss + self.lambda_mask * terms["mask"]
        if self.lpips is not None:
            terms["lpips"] = self.lpips(out.rgb, target)
            loss = loss + self.lambda_lpips * terms["lpips"]
        terms["psnr"] = -10 * torch.log10(terms["rgb"].detach().clamp_min(1e-10))
        terms["loss"] = loss
        return terms

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)

    def lr_factor(self, step: int) -> float:
        """:func:`one_cycle_lr_factor` over the run's optimizer steps (``OneCycleLR`` as in LGM)."""
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else self.warmup_steps + 1
        return one_cycle_lr_factor(step, total, self.warmup_steps)

    # ------------------------------------------------------------------ geometry
    @property
    def empty_surface_reason(self) -> str:
        return f"no Gaussian reaches opacity {self.export_min_opacity:g} (model.export_min_opacity)"

    @torch.no_grad()
    def reconstruction_geometry(self, rec: Reconstruction, batch: Batch) -> dict[str, torch.Tensor] | None:
        """Points for the geometry metrics: per object, Gaussian centres drawn with replacement in
        proportion to opacity (those below ``export_min_opacity`` left out), as many as the
        ground truth has surface points (default 4096), from the object's seed. LGM predicts no
        normals, so ``nc`` is not reported. An object with no Gaussian above the threshold is
        marked invalid (``metrics.json`` says why)."""
        gt = batch.geometry.surface_points
        n = int(gt[0].shape[0]) if gt is not None else 4096
        g = rec.representation
        pts, valid = [], []
        for b, seed in enumerate(self.object_seeds(batch)):
            one = g[b].packed()
            w = one.opacities.detach().float().cpu()
            w = torch.where(w >= max(self.export_min_opacity, 1e-12), w, torch.zeros_like(w))
            if not bool((w > 0).any()):
                pts.append(torch.zeros(n, 3, device=self.device))
                valid.append(False)
                continue
            idx = torch.multinomial(w, n, replacement=True, generator=torch.Generator().manual_seed(seed))
            pts.append(one.means.detach().float()[idx.to(one.means.device)].to(self.device))
            valid.append(True)
        return {"points": torch.stack(pts), "valid": torch.tensor(valid), "invalid_reason": self.empty_surface_reason}

    # ------------------------------------------------------------------ export
    def export_reconstruction(self, rec: Reconstruction, out_dir: Path, suffix: str = "", views: Views | None = None) -> dict[str, str]:
        """``gaussians<suffix>.ply`` of the one object of ``rec`` (3DGS layout), without the
        Gaussians below ``export_min_opacity`` (LGM's ``save_ply`` prunes at 0.005)."""
        from recon3d.render.export import export_representation

        g = rec.representation
        if self.export_min_opacity > 0:
            g = g[0].packed()
            keep = g.opacities >= self.export_min_opacity
            g = Gaussians(g.means[keep], g.quats[keep], g.scales[keep], g.opacities[keep], g.colors[keep], g.sh_degree,
                          counts=[int(keep.sum())])
        return export_representation(g, Path(out_dir), self.export_formats or ("ply",), suffix=suffix)
