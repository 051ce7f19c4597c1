"""A tiny triplane reconstructor for CPU tests of the training stack, plus fault injectors.

:class:`ToyTriplaneModule` is an honest, small image-to-3D model (an LRM in miniature): a conv
encoder pools the input views into a latent code, a linear head turns it into a triplane
(added to a learned base triplane), and target pixels are volume-rendered by sampling points
along camera rays, looking them up in the triplane and decoding density + colour with a small
MLP. Training jitters the ray samples with the global torch RNG, so a resumed run is
bit-identical only if the RNG state travels in the checkpoint. It is fast on two CPU cores at
16x16 pixels and is what the distributed, resume and bad-input tests train (``configs/toy.yaml``).

Test-only switches on the model (``nan_steps``, ``nan_grad_steps``) plant non-finite losses or
gradients. Run-control faults are *not* model hyper-parameters: :class:`FaultInjector` is a
trainer callback (SIGKILL at a step, during validation, at an epoch end), and
:class:`KillDuringWriteIO` is a checkpoint plugin that dies half-way through writing a file.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from recon3d.data.batch import Batch
from recon3d.data.cameras import Cameras
from recon3d.data.rays import camera_rays
from recon3d.methods.base import NonFiniteGuard, ReconModule
from recon3d.metrics.protocol import EvaluationProtocol
from recon3d.render.triplane import sample_triplane
from recon3d.representations import Triplanes
from recon3d.representations.reconstruction import Reconstruction
from recon3d.utils.checks import check_option
from recon3d.utils.ckpt_io import AtomicCheckpointIO

__all__ = ["ToyTriplaneModule", "FaultInjector", "KillDuringWriteIO", "DumpWeights"]


class ToyTriplaneModule(ReconModule):
    """Tiny feed-forward triplane model (module docstring).

    Args:
        latent_dim: size of the pooled image code.
        plane_channels: feature channels per plane.
        plane_resolution: triplane resolution.
        hidden: width of the decoder MLP.
        num_samples: samples per ray.
        jitter: stratified random jitter of ray samples during training.
        lr: AdamW learning rate.
        mask_weight: weight of the opacity-vs-mask loss.
        nan_steps: (tests) global steps at which the rgb loss term is made NaN.
        nan_grad_steps: (tests) global steps at which the gradients are made NaN (loss finite).
        evaluation, init_weights, init_weights_ignore, nonfinite, vis_views, validation_mode, eval_seed: see
            :class:`~recon3d.methods.base.ReconModule`.
    """

    def __init__(
        self,
        latent_dim: int = 32,
        plane_channels: int = 4,
        plane_resolution: int = 8,
        hidden: int = 16,
        num_samples: int = 12,
        jitter: bool = True,
        lr: float = 1e-2,
        mask_weight: float = 0.1,
        nan_steps: list[int] | None = None,
        nan_grad_steps: list[int] | None = None,
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
        check_option("model.lr", lr, 0.0, strict=True)
        check_option("model.mask_weight", mask_weight, 0.0)
        self.C, self.R = plane_channels, plane_resolution
        self.num_samples = num_samples
        self.jitter = jitter
        self.lr = lr
        self.mask_weight = mask_weight
        self.nan_steps = set(nan_steps or [])
        self.nan_grad_steps = set(nan_grad_steps or [])
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, latent_dim),
        )
        self.to_planes = nn.Linear(latent_dim, 3 * plane_channels * plane_resolution**2)
        nn.init.normal_(self.to_planes.weight, std=0.01)
        nn.init.zeros_(self.to_planes.bias)
        self.base_planes = nn.Parameter(torch.randn(3, plane_channels, plane_resolution, plane_resolution) * 0.1)
        self.decoder = nn.Sequential(nn.Linear(3 * plane_channels, hidden), nn.SiLU(), nn.Linear(hidden, 4))

    # ------------------------------------------------------------------ model
    def triplanes(self, batch: Batch) -> torch.Tensor:
        imgs = batch.inputs.images  # B V 3 H W
        B, V = imgs.shape[:2]
        z = self.encoder(imgs.flatten(0, 1)).view(B, V, -1).mean(1)
        planes = self.to_planes(z).view(B, 3, self.C, self.R, self.R)
        return planes + self.base_planes

    def render_planes(self, planes: torch.Tensor, cameras: Cameras, background: torch.Tensor | None) -> dict[str, torch.Tensor]:
        B, V = cameras.batch_shape
        H, W = cameras.height, cameras.width
        o, d = camera_rays(cameras)  # B V H W 3
        S = self.num_samples
        dist = o.norm(dim=-1, keepdim=True)  # B V H W 1
        near, far = (dist - 1.2).clamp_min(0.05), dist + 1.2
        u = (torch.arange(S, dtype=o.dtype, device=o.device) + 0.5) / S
        if self.training and self.jitter:
            u = u + (torch.rand(*o.shape[:-1], S, dtype=o.dtype, device=o.device) - 0.5) / S
        t = near + (far - near) * u  # B V H W S
        pts = o[..., None, :] + d[..., None, :] * t[..., None]  # B V H W S 3
        feats = sample_triplane(planes, pts.reshape(B, -1, 3), aabb=(-1.0, 1.0))
        if self.training and self.global_step in self.nan_grad_steps:
            feats.register_hook(lambda g: g * float("nan"))
        out = self.decoder(feats).view(B, V, H, W, S, 4)
        sigma = F.softplus(out[..., 0] - 1.0)
        rgb = torch.sigmoid(out[..., 1:])
        delta = (far - near) / S
        alpha = 1 - torch.exp(-sigma * delta)
        trans = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1 - alpha[..., :-1] + 1e-10], -1), -1)
        w = alpha * trans
        acc = w.sum(-1, keepdim=True)
        color = (w[..., None] * rgb).sum(-2)
        bg = torch.ones(B, 3, dtype=o.dtype, device=o.device) if background is None else background.to(o.dtype)
        color = color + (1 - acc) * bg.view(B, 1, 1, 1, 3)
        return {"rgb": color.permute(0, 1, 4, 2, 3), "alpha": acc.permute(0, 1, 4, 2, 3)}

    def decode(self, planes: torch.Tensor, points: torch.Tensor) -> dict[str, torch.Tensor]:
        """The field: ``planes (B, 3, C, R, R)``, ``points (B, N, 3)`` -> ``density (B, N)``, ``rgb (B, N, 3)``."""
        out = self.decoder(sample_triplane(planes, points, aabb=(-1.0, 1.0)))
        return {"density": F.softplus(out[..., 0] - 1.0), "rgb": torch.sigmoid(out[..., 1:])}

    # ------------------------------------------------------------------ ReconModule API
    def reconstruct(self, batch: Batch) -> Reconstruction:
        return Reconstruction(list(batch.object_ids), Triplanes(self.triplanes(batch), self.decode), {"background": batch.background})

    def render_reconstruction(self, rec: Reconstruction, cameras: Cameras) -> dict[str, torch.Tensor]:
        return self.render_planes(rec.representation.planes, cameras, rec.get("background"))

    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.render_planes(self.triplanes(batch), batch.targets.cameras, batch.background)
        terms = {"rgb": F.mse_loss(out["rgb"], batch.targets.images)}
        if batch.targets.masks is not None:
            terms["mask"] = F.mse_loss(out["alpha"], batch.targets.masks)
        if self.global_step in self.nan_steps:
            terms["rgb"] = terms["rgb"] * float("nan")
        terms["loss"] = terms["rgb"] + self.mask_weight * terms.get("mask", 0.0)
        return terms

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


# ---------------------------------------------------------------------- fault injection (tests)
def _die(what: str) -> None:
    print(f"[fault] SIGKILL {what} (pid {os.getpid()})", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


class FaultInjector(L.Callback):
    """Kill this process with SIGKILL at a chosen point (a test tool; run control, not a model
    hyper-parameter). Only the given ``rank`` dies; its DDP peers then fail on the lost link.

    Args:
        kill_after_step: die right after optimizer step ``N`` completed (after checkpoints of
            that step were written: ModelCheckpoint runs earlier in the callback list).
        kill_in_validation_epoch: die inside the validation run at the end of this epoch.
        kill_at_epoch_end: die in ``on_train_epoch_end`` of this epoch.
        rank: the global rank that dies.
    """

    def __init__(self, kill_after_step: int | None = None, kill_in_validation_epoch: int | None = None,
                 kill_at_epoch_end: int | None = None, rank: int = 0):
        self.kill_after_step = kill_after_step
        self.kill_in_validation_epoch = kill_in_validation_epoch
        self.kill_at_epoch_end = kill_at_epoch_end
        self.rank = rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and self.kill_after_step is not None and trainer.global_step == self.kill_after_step:
            _die(f"after step {trainer.global_step}")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if (trainer.global_rank == self.rank and not trainer.sanity_checking
                and self.kill_in_validation_epoch is not None and trainer.current_epoch == self.kill_in_validation_epoch):
            _die(f"during validation of epoch {trainer.current_epoch}")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == self.rank and self.kill_at_epoch_end is not None and trainer.current_epoch == self.kill_at_epoch_end:
            _die(f"at the end of epoch {trainer.current_epoch}")


class KillDuringWriteIO(AtomicCheckpointIO):
    """:class:`AtomicCheckpointIO` that dies half-way through its ``kill_on_write``-th write
    (1-based) of a file named ``target`` — after half the bytes are on disk. With
    ``atomic=False`` it writes straight to the final path as a plain ``open(path, "wb")`` would
    (the negative control: that leaves a truncated file).
    """

    def __init__(self, kill_on_write: int = 2, target: str = "last.ckpt", atomic: bool = True, allow_pickle: bool = False):
        super().__init__(allow_pickle=allow_pickle)
        self.kill_on_write = kill_on_write
        self.target = target
        self.atomic = atomic
        self._writes = 0

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if Path(path).name != self.target:
            return super().save_checkpoint(checkpoint, path, storage_options)
        self._writes += 1
        if self._writes != self.kill_on_write:
            return super().save_checkpoint(checkpoint, path, storage_options)
        import io

        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        data = buf.getvalue()

        def half_then_die(f) -> None:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            _die(f"half-way through writing {path} ({len(data) // 2} of {len(data)} bytes)")

        if self.atomic:
            from recon3d.utils.ckpt_io import write_atomically

            write_atomically(path, half_then_die)
        else:
            with open(path, "wb") as f:
                half_then_die(f)


class DumpWeights(L.Callback):
    """Write every rank's final parameters to ``<dirpath>/weights_rank<r>.safetensors`` (a test
    tool: shows that DDP ranks hold identical weights)."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_train_end(self, trainer, pl_module) -> None:
        from safetensors.torch import save

        from recon3d.utils.ckpt_io import write_atomically

        # clone: tied or parametrised weights share storage, which safetensors refuses to write
        sd = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        path = Path(self.dirpath) / f"weights_rank{trainer.global_rank}.safetensors"
        write_atomically(path, lambda f: f.write(save(sd)))
