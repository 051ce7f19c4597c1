"""``MultiViewDiffusionModule``: trains recon3d's own multi-view diffusion generator.

The model is :class:`~recon3d.models.multiview.diffusion.MultiViewDiffusion` (a
:class:`~recon3d.models.multiview.generator.MultiViewGenerator`). Data: the shared datamodule on a
dataset whose views are at the generator's fixed cameras -- the synthetic set with
``camera_layout: fixed``, ``views_per_object: V`` and the generator's elevation / fov / radius
(configs/mv_diffusion_cpu.yaml). ``num_input_views: 1`` with ``view_sampling: fixed`` picks view
0 (azimuth 0) as the condition; ``supervise_inputs: true`` with ``num_target_views: V - 1`` makes
the targets all ``V`` views in layout order (view 0 first). The module checks every batch's
cameras against the layout and says what to set if they differ.

Training (ε-prediction, Ho et al.): per object one timestep ``t ~ U{0, T-1}`` shared by its
``V`` views, noise ``eps``, ``x_t = add_noise(2 x - 1, eps, t)`` (DDPM), loss ``|eps_hat - eps|²``;
the condition is zeroed with probability ``condition_dropout`` (classifier-free guidance). The
draws come from a generator seeded by ``(seed, global step, object id)``, so a resumed run and a
DDP run draw the same numbers as an uninterrupted single-process one.

Not a reconstruction method: it produces views at its own cameras, not a 3D representation that
renders at any camera, so :meth:`reconstruct` refuses with one line, and validation / test /
predict are its own: views generated from each object's seed (``eval_seed``) scored against the
target views with the image metrics of ``evaluation`` (PSNR/SSIM/LPIPS of generated vs true
views), and predict writes each object's generated views as PNGs plus ``cameras.json``. For the
same reason it is not in the conformance suite (whose contract is "renders at the targets'
cameras, exports a 3D file"); ``tests/methods/test_mv_diffusion_module.py`` covers its training,
checkpoint reload, kill/resume and predict.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import lazy_instance

from recon3d.data.batch import Batch, Views
from recon3d.data.cameras import Cameras
from recon3d.errors import ConfigError, ShapeError
from recon3d.methods.base import NonFiniteGuard, ReconModule, own_instance
from recon3d.metrics.protocol import EvaluationProtocol
from recon3d.models.multiview.diffusion import MultiViewDiffusion
from recon3d.representations.reconstruction import object_seed, object_seeds

__all__ = ["MultiViewDiffusionModule"]

log = logging.getLogger(__name__)


class MultiViewDiffusionModule(ReconModule):
    """Trains and samples a :class:`MultiViewDiffusion` generator (module docstring).

    Args:
        generator: the multi-view diffusion model (``class_path`` in YAML).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: linear learning-rate warm-up from 0 over this many optimizer steps.
        condition_dropout: probability of training an object unconditionally (zero condition).
        seed: seed of the training draws (timesteps, noise, condition dropout).
        camera_atol: tolerance of the check that the data's cameras are the generator's layout.
        evaluation / init_weights / nonfinite / vis_views / init_weights_ignore / validation_mode
            / eval_seed: as :class:`ReconModule` (``evaluation``: image metrics only).
    """

    #: a generator, not a reconstruction method: outside the conformance suite (module docstring)
    RECONSTRUCTS_3D = False

    def __init__(
        self,
        generator: MultiViewDiffusion = lazy_instance(MultiViewDiffusion),
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        condition_dropout: float = 0.1,
        seed: int = 0,
        camera_atol: float = 1e-4,
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
        if not 0.0 <= condition_dropout < 1.0:
            raise ConfigError(f"model.condition_dropout: expected a probability in [0, 1), got {condition_dropout}")
        if lr <= 0 or warmup_steps < 0:
            raise ConfigError(f"model.lr / model.warmup_steps: expected lr > 0 and warmup_steps >= 0, got {lr}, {warmup_steps}")
        self.save_hyperparameters()
        self.net = own_instance(generator)
        self.lr, self.weight_decay, self.betas, self.warmup_steps = lr, weight_decay, tuple(betas), int(warmup_steps)
        self.condition_dropout, self.seed, self.camera_atol = float(condition_dropout), int(seed), float(camera_atol)
        self._train_scheduler = self.net.train_scheduler()

    # ------------------------------------------------------------------ data checks
    def _check_layout(self, cams: Cameras | None, what: str, views: list[int]) -> None:
        """``cams (B, len(views))`` must be the generator's cameras ``views``; one ConfigError line otherwise."""
        net = self.net
        hint = (f"the generator's layout is {net.num_views} views at azimuths {net.azimuths}, elevations {net.elevations}, "
                f"radius {net.radius:g}, fov {net.fov_deg:g}, {net.resolution}² (use SyntheticDataset camera_layout: fixed, "
                f"views_per_object: {net.num_views} with those numbers, view_sampling fixed; configs/mv_diffusion_cpu.yaml)")
        if cams is None:
            raise ConfigError(f"data: {what} have no cameras; {hint}")
        want = net.cameras(cams.batch_shape[0]).to(cams.device)[:, views]
        if (cams.width, cams.height) != (want.width, want.height) or cams.projection != want.projection:
            raise ConfigError(f"data: {what} are {cams.width}x{cams.height} {cams.projection}; {hint}")
        err = torch.maximum((cams.c2w - want.c2w).abs().amax(dim=(-1, -2)), (cams.K - want.K).abs().amax(dim=(-1, -2)) / want.K[..., 0, 0])
        if float(err.max()) > self.camera_atol:
            b, v = divmod(int(err.argmax()), err.shape[1])
            raise ConfigError(f"data: {what} are not the generator's cameras (object {b}, view {views[v]} differs by "
                              f"{float(err.max()):.3g}); {hint}")

    def _condition_and_targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, R, R)`` condition in ``[0, 1]`` and ``(B, V, 3, R, R)`` targets, checked."""
        net = self.net
        self._check_layout(batch.inputs.cameras[:, :1] if batch.inputs.cameras is not None else None, "input view 0", [0])
        tgt = batch.targets.images
        if tgt.shape[1] != net.num_views:
            raise ShapeError(f"targets: expected the generator's {net.num_views} views per object (data.num_target_views "
                             f"{net.num_views - 1} with supervise_inputs), got {tgt.shape[1]}")
        self._check_layout(batch.targets.cameras, "target views", list(range(net.num_views)))
        return batch.inputs.images[:, 0], tgt

    # ------------------------------------------------------------------ training
    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        cond, tgt = self._condition_and_targets(batch)
        dev = tgt.device
        T = self._train_scheduler.config.num_train_timesteps
        step = int(self.global_step)
        gens = [torch.Generator().manual_seed(object_seed(i, self.seed * 1_000_003 + step)) for i in batch.object_ids]
        t = torch.stack([torch.randint(0, T, (), generator=g) for g in gens]).to(dev)
        keep = torch.stack([torch.rand((), generator=g) >= self.condition_dropout for g in gens]).to(dev)
        noise = torch.stack([torch.randn(tgt.shape[1:], generator=g) for g in gens]).to(tgt)
        noisy = self._train_scheduler.add_noise(tgt * 2 - 1, noise, t)
        eps = self.net.predict_noise(noisy, t, self.net.prepare_condition(cond), keep)
        loss = torch.nn.functional.mse_loss(eps, noise)
        return {"mse": loss, "loss": loss}

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)

    def lr_factor(self, step: int) -> float:
        return 1.0 if self.warmup_steps == 0 else min(1.0, (step + 1) / self.warmup_steps)

    # ------------------------------------------------------------------ sampling
    def generate(self, batch: Batch) -> Views:
        """The generated views of every object of ``batch`` from its condition view, each object's
        noise from its own seed (:func:`~recon3d.representations.reconstruction.object_seed` of
        ``eval_seed``), so a sample does not depend on the batch it is in."""
        cond = batch.inputs.images[:, 0]
        gens = [torch.Generator().manual_seed(s) for s in object_seeds(list(batch.object_ids), self.eval_seed)]
        return self.net.generate(cond, generator=gens)

    def reconstruct(self, batch: Batch):
        raise ConfigError(f"{type(self).__name__} is a multi-view generator: it reconstructs no 3D representation "
                          "(use generate(batch) or the generator's generate/refine, e.g. in the MVBoost pipeline)")

    def render_views(self, batch: Batch, cameras: Cameras):
        """The generated views as ``{"rgb": (B, V, 3, R, R)}``, for ``cameras`` that are the
        generator's layout (a generator has no other views to give)."""
        self._check_layout(cameras, "the requested cameras", list(range(self.net.num_views)))
        return {"rgb": self.generate(batch).images}

    # ------------------------------------------------------------------ evaluation / predict
    def _eval_step(self, batch: Batch, split: str) -> None:
        if self._record_skips(batch):
            return
        if self.validation_mode == "loss" and split == "val":
            return super()._eval_step(batch, split)
        _, tgt = self._condition_and_targets(batch)
        pred = self.generate(batch).images
        if self.evaluation is not None:
            self.evaluation.update_views(batch.object_ids, pred, tgt, batch.targets.masks)
        self._save_grid(batch, pred, split)

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict[str, str]]:
        """Write every object's generated views (``view_<k>.png``) and their ``cameras.json``
        (OpenCV ``c2w``, pixel ``K``, size, projection) under ``predict/<object id>/``."""
        if self._record_skips(batch):
            return []
        from recon3d.utils.images import save_png
        from recon3d.utils.io import atomic_path

        out_root = Path(getattr(self, "_export_root", None) or self._out_dir() / "predict")
        views = self.generate(batch)
        results = []
        for b, oid in enumerate(batch.object_ids):
            d = out_root / oid
            files = {f"view_{k}": str(save_png(d / f"view_{k}.png", views.images[b, k])) for k in range(views.num_views)}
            cams = views.cameras[b]
            meta = {"projection": cams.projection, "width": cams.width, "height": cams.height,
                    "c2w": cams.c2w.cpu().tolist(), "K": cams.K.cpu().tolist(), "convention": "opencv"}
            with atomic_path(d / "cameras.json") as tmp:
                Path(tmp).write_text(json.dumps(meta))
            files["cameras"] = str(d / "cameras.json")
            results.append(files)
        return results
