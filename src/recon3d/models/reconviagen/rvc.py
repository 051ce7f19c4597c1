"""Rendering-aware velocity compensation (RVC; ReconViaGen paper §4.2.3.2), for any flow model.

RVC corrects the velocity of the late denoising steps so that the clean sample predicted at each
step renders like the input views at their estimated cameras. It needs three things besides the
flow: ``decode`` (predicted clean latent x̂0 -> a representation, e.g. SLAT -> Gaussians),
a renderer (default :func:`recon3d.render.render`, differentiable for Gaussians and meshes) and
the input views with cameras in the generator's frame (e.g. from
:class:`~recon3d.models.reconviagen.pose.PoseRefiner`). Two entry points:

* :class:`VelocityCompensation`: a per-step hook for :class:`~recon3d.models.flow.FlowEulerSampler`
  (``sampler.sample(..., hook=VelocityCompensation(...))``);
* :class:`RVCRefiner`: a :class:`~recon3d.models.refiners.Refiner` that re-noises a
  reconstruction's latent to ``start_t`` and re-runs the remaining steps with the hook.

At a step from ``t`` to ``t_prev`` with ``t < start_t`` (conventions of
:mod:`recon3d.models.flow`: ``t = 1`` noise, ``x̂0 = (1 - sigma_min) x_t - (sigma_min + (1 -
sigma_min) t) v``, i.e. the paper's ``x̂0 = x_t - t v`` for ``sigma_min = 0``):

1. render ``decode(x̂0)`` at the cameras, per-view loss ``L_i`` (:class:`~recon3d.models.reconviagen.losses.RenderingLoss`);
2. drop the views with ``L_i > drop_threshold`` (0.8: views whose camera is probably wrong);
   per object the loss is the mean over its kept views, and the batch loss their sum (an
   object's correction does not depend on its batch neighbours);
3. correct the velocity and take the Euler step with it.

``mode="paper"`` (default): one gradient of the loss with respect to x̂0,
``δv = ∂L/∂x̂0``, applied as ``v' = v + α δv`` with ``α = 0.1`` -- this moves the predicted
clean sample by ``-α s(t) ∂L/∂x̂0`` (a descent step on L), so the update goes "through x̂0" as
the paper describes. (The extracted paper text lost the formula itself; this is our reading,
with the sign that lowers L.) Its size scales with the loss gradient, which for a mean loss over
many latents is small per element: ``alpha`` is the knob.

``mode="official"`` (ReconViaGen's ``sample_slat_once_opt_delta_v``): ``v`` itself becomes the
parameter of ``steps = 5`` Adam steps (lr 0.1, betas (0.5, 0.9)) on
``L + reg_weight · L1(v, v_pred)`` (``reg_weight`` 0.2, the mean absolute change of the
velocity), the views re-thresholded at every Adam step; the Euler step then uses the optimised
``v`` as it is (no α).

Differences between the paper and the official code (each an option here):

=========================  ===============================  ===========================================
what                       paper (default)                  official code
=========================  ===============================  ===========================================
when                       ``t < 0.5``                      ``t <= 0.5`` (``inclusive=True``)
loss                       (1 - SSIM) + LPIPS + DreamSim    L1 + (1 - SSIM) + LPIPS + DreamSim
correction                 ``v + α ∂L/∂x̂0``, α = 0.1       5 Adam steps on v + 0.2 L1(v, v_pred)
decoded for rendering      a textured mesh                  Gaussians only, 259², black background
=========================  ===============================  ===========================================

(Here: whatever ``decode`` returns, at the cameras' size or ``resolution``; the background is the
renderer's, ``background`` -- the input images must stand on the same colour.)

**All views dropped.** The official ``loss[loss <= 0.8].mean()`` is NaN when no view passes, and
the NaN reaches the latent. Here a step (or an Adam iteration) with no kept view of any object
applies no correction (plain Euler step, resp. the velocity optimised so far); every such step is
counted in :attr:`VelocityCompensation.all_dropped` and the first one logs a warning. An object
whose views are all dropped while others' are kept gets no correction either (its loss term is 0).

Everything the hook computes is recorded per step in :attr:`VelocityCompensation.history`.
The sampler calls the hook under ``torch.enable_grad()``; inside Lightning's ``inference_mode``
predict loop run it through :class:`RVCRefiner` (or inside
:func:`~recon3d.models.refiners.test_time_optimization`, with ordinary tensors).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from recon3d.data.batch import Views
from recon3d.data.cameras import Cameras
from recon3d.errors import ConfigError, ShapeError
from recon3d.models.flow import FlowEulerSampler, FlowStep, StepUpdate, layout_of
from recon3d.models.reconviagen.losses import RenderingLoss
from recon3d.models.refiners.base import Refiner, test_time_optimization, trainable_copy
from recon3d.representations import RenderOutput
from recon3d.representations.reconstruction import Reconstruction
from recon3d.representations.voxels import SparseVoxels
from recon3d.utils.checks import check_option

__all__ = ["VelocityCompensation", "RVCRefiner", "MODES"]

log = logging.getLogger(__name__)

MODES = ("paper", "official")

State = torch.Tensor | SparseVoxels


def _render_default(background, opts):
    def fn(rep, cameras: Cameras):
        from recon3d.render import render

        return render(rep, cameras, background, **opts)

    return fn


def _feats(x: State) -> torch.Tensor:
    return x.feats if isinstance(x, SparseVoxels) else x


def _with_feats(template: State, f: torch.Tensor) -> State:
    return template.replace(feats=f) if isinstance(template, SparseVoxels) else f


class VelocityCompensation:
    """The RVC per-step hook (module docstring).

    Args:
        decode: ``x̂0 -> representation`` of ``B`` objects, differentiable (x̂0 has the
            sampler state's type: a ``(B, ...)`` tensor or ``SparseVoxels``).
        images: input views ``(B, V, 3, H, W)`` in [0, 1], on the renderer's background.
        cameras: their cameras ``(B, V)`` in the generator's (decoder's) frame.
        loss: the per-view loss (default ``RenderingLoss("paper")`` / ``("official")`` by mode).
        mode: ``"paper"`` (gradient through x̂0, α) or ``"official"`` (Adam on v).
        start_t: RVC runs at steps with ``t < start_t`` (``<=`` with ``inclusive``).
        inclusive: None follows the mode (paper False, official True).
        alpha: α of the paper's update.
        steps, lr, betas, reg_weight: the official Adam optimisation (5, 0.1, (0.5, 0.9), 0.2).
        drop_threshold: views with a loss above it are dropped (0.8).
        render: ``(representation, cameras) -> RenderOutput`` or an ``rgb (B, V, 3, H, W)``
            tensor; default :func:`recon3d.render.render` on ``background``.
        background: the default renderer's background (official: black).
        render_opts: options of the default renderer (e.g. ``{"backend": "torch"}``).
        resolution: square size to resize views and cameras to before rendering (official 259);
            None keeps the cameras' size.
        batch_index: ``(N,)`` object of every row, for a packed (non-SparseVoxels) flat state.
    """

    def __init__(self, decode: Callable[[State], Any], images: torch.Tensor, cameras: Cameras, loss: RenderingLoss | None = None,
                 mode: str = "paper", start_t: float = 0.5, inclusive: bool | None = None, alpha: float = 0.1, steps: int = 5,
                 lr: float = 0.1, betas: Sequence[float] = (0.5, 0.9), reg_weight: float = 0.2, drop_threshold: float = 0.8,
                 render: Callable[[Any, Cameras], Any] | None = None, background: Any = "black", resolution: int | None = None,
                 batch_index: torch.Tensor | None = None, render_opts: dict | None = None):
        if mode not in MODES:
            raise ConfigError(f"mode: expected one of {list(MODES)}, got {mode!r}")
        check_option("start_t", start_t, 0.0)
        check_option("alpha", alpha, 0.0)
        check_option("steps", steps, 1, integer=True)
        check_option("lr", lr, 0.0, strict=True)
        check_option("reg_weight", reg_weight, 0.0)
        check_option("drop_threshold", drop_threshold)
        check_option("resolution", resolution, 1, integer=True, allow_none=True)
        try:
            b1, b2 = (float(b) for b in betas)
        except (TypeError, ValueError):
            raise ConfigError(f"betas: expected two numbers, got {betas!r}") from None
        if images.ndim != 5 or images.shape[2] != 3:
            raise ShapeError(f"images: expected (B, V, 3, H, W), got {list(images.shape)}")
        if not isinstance(cameras, Cameras) or tuple(cameras.batch_shape) != tuple(images.shape[:2]):
            shape = list(cameras.batch_shape) if isinstance(cameras, Cameras) else type(cameras).__name__
            raise ShapeError(f"cameras: expected Cameras of batch shape {list(images.shape[:2])} (the images' B, V), got {shape}")
        H, W = images.shape[-2:]
        if resolution is None and (cameras.height, cameras.width) != (H, W):
            raise ShapeError(f"cameras: {cameras.width}x{cameras.height} for images of {W}x{H}; give matching cameras or a resolution")
        if resolution is not None:
            r = int(resolution)
            images = F.interpolate(images.flatten(0, 1), size=(r, r), mode="bilinear", align_corners=False).view(*images.shape[:3], r, r)
            cameras = cameras.resized(r, r)
        self.decode, self.images, self.cameras = decode, images, cameras
        self.loss = loss if loss is not None else RenderingLoss("paper" if mode == "paper" else "official")
        self.mode, self.start_t = mode, float(start_t)
        self.inclusive = (mode == "official") if inclusive is None else bool(inclusive)
        self.alpha, self.steps, self.lr, self.betas = float(alpha), int(steps), float(lr), (b1, b2)
        self.reg_weight, self.drop_threshold = float(reg_weight), float(drop_threshold)
        self.render = render if render is not None else _render_default(background, dict(render_opts or {}))
        self.batch_index = batch_index
        #: one record per sampler step (applied or not): index, t, applied, per-view losses, kept mask.
        self.history: list[dict[str, Any]] = []
        #: steps (and official Adam iterations) at which every view of every object was dropped.
        self.all_dropped = 0
        self._warned = False

    # ------------------------------------------------------------------ pieces
    def active_at(self, t: float) -> bool:
        """Whether RVC runs at a step starting at time ``t``."""
        return t <= self.start_t if self.inclusive else t < self.start_t

    def view_losses(self, x0: State) -> torch.Tensor:
        """Per-view loss ``(B, V)`` of ``decode(x0)`` rendered at the cameras, against the images."""
        out = self.render(self.decode(x0), self.cameras)
        rgb = out.rgb if isinstance(out, RenderOutput) else out
        B, V = self.images.shape[:2]
        if not torch.is_tensor(rgb) or tuple(rgb.shape) != tuple(self.images.shape):
            got = list(rgb.shape) if torch.is_tensor(rgb) else type(rgb).__name__
            raise ShapeError(f"render: expected rgb of shape {list(self.images.shape)} (the views'), got {got}")
        return self.loss(rgb.flatten(0, 1), self.images.to(rgb).flatten(0, 1)).view(B, V)

    @torch.no_grad()
    def evaluate(self, x0: State) -> torch.Tensor:
        """``(B, V)`` per-view loss of a clean state (e.g. the final sample), without gradients."""
        return self.view_losses(x0)

    def _objective(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch loss (sum over objects of the mean over kept views) and the kept mask ``(B, V)``."""
        kept = torch.isfinite(losses.detach()) & (losses.detach() <= self.drop_threshold)
        n = kept.sum(1)
        per_obj = torch.where(kept, losses, torch.zeros_like(losses)).sum(1) / n.clamp_min(1)
        return per_obj.sum(), kept

    def _note_all_dropped(self, step: FlowStep) -> None:
        self.all_dropped += 1
        if not self._warned:
            self._warned = True
            log.warning("RVC: at step %d (t=%.3f) every view's loss is above drop_threshold=%g, so no velocity correction is applied "
                        "there (the official mean over kept views would be NaN); later such steps are counted in "
                        "VelocityCompensation.all_dropped", step.index, step.t, self.drop_threshold)

    # ------------------------------------------------------------------ the hook
    def __call__(self, step: FlowStep) -> StepUpdate | None:
        rec: dict[str, Any] = {"index": step.index, "t": step.t, "applied": False}
        self.history.append(rec)
        if not self.active_at(step.t):
            return None
        sampler, t = step.sampler, step.t
        x_t, v0 = step.x_t, step.v
        if self.mode == "paper":
            x0f = _feats(sampler.x0_from_velocity(x_t, t, v0)).detach().clone().requires_grad_(True)
            losses = self.view_losses(_with_feats(x_t, x0f))
            total, kept = self._objective(losses)
            rec.update(losses=losses.detach().cpu(), kept=kept.cpu())
            if not bool(kept.any()):
                rec["reason"] = "all views dropped"
                self._note_all_dropped(step)
                return None
            (grad,) = torch.autograd.grad(total, x0f)
            if not bool(torch.isfinite(grad).all()):
                rec["reason"] = "non-finite gradient"
                log.warning("RVC: non-finite gradient at step %d (t=%.3f); no correction there", step.index, t)
                return None
            rec["applied"] = True
            rec["correction_norm"] = float(grad.norm()) * self.alpha
            return StepUpdate(v=_with_feats(v0, _feats(v0) + self.alpha * grad))
        # official: Adam on v
        lay = layout_of(v0, self.batch_index, name="v")
        v_ref = _feats(v0).detach()
        p = v_ref.clone().requires_grad_(True)
        opt = torch.optim.Adam([p], lr=self.lr, betas=self.betas)
        rec["loss_history"], rec["kept_history"] = [], []
        used = 0
        for _ in range(self.steps):
            losses = self.view_losses(sampler.x0_from_velocity(x_t, t, _with_feats(v0, p)))
            total, kept = self._objective(losses)
            if "losses" not in rec:
                rec.update(losses=losses.detach().cpu(), kept=kept.cpu())
            rec["kept_history"].append(kept.cpu())
            if not bool(kept.any()):
                self._note_all_dropped(step)
                rec["reason"] = "all views dropped"
                break
            reg = lay.mean((p - v_ref).abs()).sum().to(total.dtype)
            obj = total + self.reg_weight * reg
            rec["loss_history"].append(float(obj.detach()))
            opt.zero_grad(set_to_none=True)
            obj.backward()
            if not bool(torch.isfinite(p.grad).all()):
                rec["reason"] = "non-finite gradient"
                log.warning("RVC: non-finite gradient at step %d (t=%.3f); keeping the velocity optimised so far", step.index, t)
                break
            opt.step()
            used += 1
        if used == 0:
            return None
        rec["applied"] = True
        rec["adam_steps"] = used
        return StepUpdate(v=_with_feats(v0, p.detach()))


class RVCRefiner(Refiner):
    """RVC as a test-time refiner (module docstring): re-noise the reconstruction's latent to the
    first time-grid step RVC acts on and run the remaining Euler steps with :class:`VelocityCompensation`.

    Args:
        model: the flow network ``model(x_t, t * 1000, cond) -> v``.
        sampler: the :class:`FlowEulerSampler` (its grid, guidance and conventions are used).
        decode: ``latent -> representation`` (the one put in the result).
        latent_key: ``extras`` key of the sampled clean latent (``(B, ...)`` tensor or SparseVoxels).
        cond_key, neg_cond_key: ``extras`` keys of the condition (and negative condition) the
            latent was sampled with (None: unconditional / the sampler's default).
        seed: seed of the re-noising (one generator per object).
        **rvc: :class:`VelocityCompensation` options (``mode``, ``start_t``, ``alpha``, ``loss`` ...).

    Cameras: the reconstruction's predicted ones (``reconstruction.cameras``, taken to be in the
    generator's frame -- e.g. after :class:`~recon3d.models.reconviagen.pose.PoseRefiner`), else
    the views' own. Images: ``views.images``. The steps before ``start_t`` are not integrated:
    their state is the re-noised latent ``(1 - t) x0 + s(t) ε`` (the model is not called there).
    The result's representation is ``decode`` of the new latent; the latent and the hook's record
    (``history``, ``all_dropped``, per-view losses before/after) go to ``extras[latent_key]`` and
    ``extras["rvc"]``.
    """

    name = "rvc"

    def __init__(self, model: Callable[..., State], sampler: FlowEulerSampler, decode: Callable[[State], Any],
                 latent_key: str = "latent", cond_key: str | None = "cond", neg_cond_key: str | None = None, seed: int = 0, **rvc):
        self.model, self.sampler, self.decode = model, sampler, decode
        self.latent_key, self.cond_key, self.neg_cond_key, self.seed = latent_key, cond_key, neg_cond_key, int(seed)
        self.rvc = rvc

    def refine(self, reconstruction: Reconstruction, views: Views) -> Reconstruction:
        if self.latent_key not in reconstruction.extras:
            raise ConfigError(f"RVCRefiner: the reconstruction has no extras[{self.latent_key!r}] (the sampled latent); "
                              f"it has {sorted(reconstruction.extras)}")
        cams = reconstruction.cameras if reconstruction.cameras is not None else views.cameras
        if cams is None:
            raise ConfigError("RVCRefiner: neither the reconstruction nor the views have cameras; estimate them first (PoseRefiner)")
        B = len(reconstruction)
        with test_time_optimization():
            latent = reconstruction.extras[self.latent_key]
            latent = latent.replace(feats=trainable_copy(latent.feats)) if isinstance(latent, SparseVoxels) else trainable_copy(latent)
            cams = Cameras(trainable_copy(cams.c2w).float(), trainable_copy(cams.K).float(), cams.width, cams.height, cams.projection)
            images = trainable_copy(views.images).float()
            cond = _copy_tree(reconstruction.extras.get(self.cond_key)) if self.cond_key else None
            neg = _copy_tree(reconstruction.extras.get(self.neg_cond_key)) if self.neg_cond_key else None
            hook = VelocityCompensation(self.decode, images.to(_feats(latent).device), cams.to(_feats(latent).device), **self.rvc)
            gens = [torch.Generator(device=_feats(latent).device).manual_seed(self.seed + b) for b in range(B)]
            noise = self.sampler.noise_like(latent, gens)
            before = hook.evaluate(latent)
            grid = self.sampler.times().tolist()
            first = next((k for k in range(self.sampler.steps) if hook.active_at(grid[k])), None)
            if first is None:
                raise ConfigError(f"RVCRefiner: no step of the sampler's grid lies below start_t={hook.start_t:g}")
            sig = self.sampler.sigma_min

            def renoised(t: float) -> State:
                f = (1 - t) * _feats(latent) + (sig + (1 - sig) * t) * _feats(noise)
                return _with_feats(latent, f)

            def model(x, tt, c, **kw):  # steps before `first` are replaced by the re-noised latent: skip the network there
                # tt is float32 t * 1000: compare with a margin far above its rounding, far below a grid gap
                if float(tt.flatten()[0]) / self.sampler.time_scale > grid[first] + 1e-6:
                    return _with_feats(x, torch.zeros_like(_feats(x)))
                return self.model(x, tt, c, **kw)

            def step_hook(step: FlowStep) -> StepUpdate | None:
                if step.index < first:
                    return StepUpdate(x_prev=renoised(step.t_prev))
                return hook(step)

            out = self.sampler.sample(model, noise, cond, neg, hook=step_hook)
            new = out.samples
            after = hook.evaluate(new)
            rep = self.decode(new)
        record = {"history": hook.history, "all_dropped": hook.all_dropped, "start_step": first, "loss": hook.loss.name,
                  "view_loss_before": before.cpu(), "view_loss_after": after.cpu()}
        extras = {**reconstruction.extras, self.latent_key: new, "rvc": record}
        return reconstruction.replace(representation=rep, extras=extras)

    def summary(self, refined: Reconstruction) -> dict[str, str]:
        rec = refined.get("rvc")
        if not rec:
            return {}
        b, a = rec["view_loss_before"][0], rec["view_loss_after"][0]
        return {"rvc_view_loss": f"{rec['loss']} {float(b.mean()):.4f}->{float(a.mean()):.4f}",
                "rvc_all_dropped_steps": str(rec["all_dropped"])}


def _copy_tree(c: Any) -> Any:
    if torch.is_tensor(c):
        return trainable_copy(c)
    if isinstance(c, (list, tuple)):
        return type(c)(_copy_tree(x) for x in c)
    if isinstance(c, dict):
        return {k: _copy_tree(v) for k, v in c.items()}
    return c
