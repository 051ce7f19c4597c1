"""Euler sampler for rectified flows (TRELLIS's ``FlowEulerSampler`` family, every guidance convention).

Conventions are those of :mod:`recon3d.models.flow.objective`: ``t = 1`` noise, ``t = 0`` data,
the model predicts ``v = d x_t / d t`` and is called ``model(x_t, t * 1000, cond, **kwargs)``
with ``t * 1000`` a ``(B,)`` float32 tensor.

**Time grid.** ``t_k = r * u_k / (1 + (r - 1) * u_k)`` for ``u = linspace(1, 0, N + 1)`` and
``r = rescale_t`` (``r > 1`` spends more steps near the noise end). Step ``k`` goes from ``t_k`` to
``t_{k+1}``: ``x <- x - (t_k - t_{k+1}) * v``. diffusers' ``FlowMatchEulerDiscreteScheduler``
gives the same grid only with ``shift = rescale_t`` and explicit ``sigmas = linspace(1, 0, N + 1)[:-1]``
(its default ``set_timesteps(N)`` grid differs, by 0.205 at N = 12, r = 3) and only in float32
(6e-8 off); ``time_grid="diffusers"`` uses it, the default ``"trellis"`` computes upstream's float64
grid directly. The scheduler has no place for sigma_min (its step is the same Euler update; x0 is
``x - sigma * v``, not the sigma_min-aware inverse), CFG, the guidance interval, guidance rescale,
multi-condition modes or a per-step hook, so everything past the grid is done here.

**Classifier-free guidance**, two spellings of one formula (``v_c`` conditional, ``v_u``
unconditional = the model on ``neg_cond``, zeros by default as upstream)::

    cfg_convention="trellis":      v = (1 + w) * v_c - w * v_u       (no guidance: w = 0)
    cfg_convention="reconviagen":  v = w * v_c + (1 - w) * v_u       (no guidance: w = 1)

They are the same for ``w_reconviagen = 1 + w_trellis`` (e.g. ReconViaGen's demo 7.5 is TRELLIS's
6.5). Without guidance the unconditional model is not evaluated.

**Guidance interval** ``(lo, hi)``: guidance only at steps with ``lo <= t_k <= hi``; elsewhere the
conditional prediction alone (TRELLIS ``GuidanceIntervalSamplerMixin``; ReconViaGen the same with
``cfg_strength = 1``).

**Guidance rescale** ``phi`` (ReconViaGen's ``ClassifierFreeGuidanceSamplerMixin``), only where
guidance is applied: with ``x0_c = x0(v_c)`` and ``x0_g = x0(v)``, per object ``b``
``sigma_c[b] = std(x0_c[b])``, ``sigma_g[b] = std(x0_g[b])`` over all of the object's elements
(every non-batch dim of a dense tensor, all ``N_b x C`` features of a packed one; Bessel-corrected
as ``torch.std``), ``x0 = phi * x0_g * sigma_c / sigma_g + (1 - phi) * x0_g`` and ``v`` is recomputed
from ``x0``. An object with ``sigma_g = 0`` or fewer than two elements keeps ``x0_g`` (upstream
would divide by zero).

**Several conditions** (``multi_condition``, ``cond`` a sequence of V per-view conditions):
``"stochastic"`` (TRELLIS-S) uses view ``k % V`` at step ``k`` (round-robin, as upstream, not random);
``"multidiffusion"`` (TRELLIS-M) uses ``v_c = mean_i v(c_i)`` and then the guidance formula, so
``(1 + w) mean_i v(c_i) - w v(neg)`` in TRELLIS's spelling. ``neg_cond`` is one condition.

**Per-step hook** (ReconViaGen's rendering-aware velocity compensation plugs in here), contract:

* called once per step, after the (guided, rescaled) velocity is formed and before the Euler
  update, as ``hook(step)`` with a :class:`FlowStep` holding ``index`` (0-based), ``t``,
  ``t_prev`` (Python floats, ``t > t_prev``), ``x_t``, ``v``, ``x0 = x0(v)``, ``v_cond``,
  ``v_uncond`` (None when not evaluated), ``guided`` and the ``sampler`` (for
  :meth:`FlowEulerSampler.x0_from_velocity` / :meth:`~FlowEulerSampler.velocity_from_x0`); the
  states have the type of ``noise`` (tensor or ``SparseVoxels``) and are detached;
* runs under ``torch.enable_grad()`` (model evaluations run under ``torch.no_grad()``), so it can
  optimise ``v`` through a decoder and renderer -- unless ``sample`` is called inside
  ``torch.inference_mode()``, whose tensors cannot enter autograd;
* returns ``None`` (plain Euler step) or a :class:`StepUpdate` with exactly one of
  ``v`` (the step becomes ``x_t - (t - t_prev) * v``; the recorded x0 is ``x0(v)``) or
  ``x_prev`` (used as the next state as is), of the state's type and shape;
* it may keep state of its own (e.g. apply only for ``t <= 0.5``, as ReconViaGen does).

Seeds: :meth:`FlowEulerSampler.noise_like` draws the initial noise per object from a sequence of
generators (one each), so an object's sample does not depend on its batch neighbours; the Euler
loop itself draws nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from recon3d.errors import ConfigError, ShapeError
from recon3d.representations.voxels import SparseVoxels
from recon3d.utils.checks import check_option

from .layout import FlowLayout, Generators, layout_of, randn_per_object
from .objective import _check_choice, check_sigma_min, condition_batch_size, map_condition

__all__ = ["FlowEulerSampler", "FlowStep", "StepUpdate", "FlowSample", "time_grid"]

State = torch.Tensor | SparseVoxels


def _check_grid_args(steps: object, rescale_t: object) -> None:
    check_option("steps", steps, 1, integer=True)
    check_option("rescale_t", rescale_t, 0.0, strict=True)


def time_grid(steps: int, rescale_t: float = 1.0, backend: str = "trellis") -> torch.Tensor:
    """``(steps + 1,)`` float64 times from 1 down to 0 (module docstring, "Time grid").

    ``backend="trellis"`` computes upstream's numpy float64 grid; ``"diffusers"`` reads
    ``FlowMatchEulerDiscreteScheduler(shift=rescale_t)``'s sigmas after
    ``set_timesteps(sigmas=linspace(1, 0, steps + 1)[:-1])`` (float32, within 1e-7 of the former).
    """
    _check_grid_args(steps, rescale_t)
    _check_choice("time_grid", backend, ("trellis", "diffusers"))
    u = np.linspace(1.0, 0.0, int(steps) + 1)
    if backend == "trellis":
        r = float(rescale_t)
        return torch.from_numpy(r * u / (1 + (r - 1) * u))
    from diffusers import FlowMatchEulerDiscreteScheduler  # slow import: only when asked for

    sched = FlowMatchEulerDiscreteScheduler(shift=float(rescale_t))
    sched.set_timesteps(sigmas=u[:-1])
    return sched.sigmas.to(torch.float64).cpu()


@dataclass
class FlowStep:
    """What the per-step hook receives (module docstring, "Per-step hook")."""

    index: int
    t: float
    t_prev: float
    x_t: State
    v: State
    x0: State
    v_cond: State
    v_uncond: State | None
    guided: bool
    sampler: FlowEulerSampler


@dataclass
class StepUpdate:
    """A hook's correction: exactly one of ``v`` (a replacement velocity) or ``x_prev`` (the next state)."""

    v: State | None = None
    x_prev: State | None = None


@dataclass
class FlowSample:
    """``samples``: the final state (type of the noise); ``times``: the ``(N + 1,)`` grid used;
    ``x_t`` / ``x0``: per step the state after the step and the x0 prediction (empty unless
    ``keep_trajectory``)."""

    samples: State
    times: torch.Tensor
    x_t: list[State] = field(default_factory=list)
    x0: list[State] = field(default_factory=list)


class FlowEulerSampler:
    """Euler sampler with CFG, guidance interval, guidance rescale, multi-condition modes and a
    per-step hook (module docstring).

    Args:
        sigma_min: noise floor of the flow, in ``[0, 1)`` (TRELLIS 1e-5); enters x0 only.
        steps: number of Euler steps ``N >= 1``.
        rescale_t: time warp ``r > 0`` (1 = uniform grid).
        cfg_strength: guidance weight ``w`` in the chosen convention.
        cfg_convention: ``"trellis"`` ((1 + w) v_c - w v_u) or ``"reconviagen"`` (w v_c + (1 - w) v_u).
        cfg_interval: ``(lo, hi)`` with ``0 <= lo <= hi <= 1``: guidance only where ``lo <= t <= hi``.
        guidance_rescale: ``phi`` in ``[0, 1]`` (0 = off).
        multi_condition: None, ``"stochastic"`` (TRELLIS-S) or ``"multidiffusion"`` (TRELLIS-M).
        time_grid: ``"trellis"`` (float64 formula) or ``"diffusers"`` (the scheduler's sigmas).
        time_scale: factor on ``t`` for the network input (1000).

    Upstream settings, for reference: TRELLIS app SS/SLAT 12 steps, w 7.5 / 3 (trellis convention),
    rescale_t 3; ReconViaGen demo SS 30 steps, w 7.5 (reconviagen convention), rescale 0.7,
    rescale_t 5, interval (0.6, 1); SLAT 12 steps, w 7.5, rescale 0.5, rescale_t 3, interval
    (0.6, 1), multidiffusion.
    """

    CONVENTIONS = ("trellis", "reconviagen")
    MULTI = (None, "stochastic", "multidiffusion")

    def __init__(self, sigma_min: float = 1e-5, steps: int = 12, rescale_t: float = 1.0, cfg_strength: float = 0.0,
                 cfg_convention: str = "trellis", cfg_interval: Sequence[float] = (0.0, 1.0), guidance_rescale: float = 0.0,
                 multi_condition: str | None = None, time_grid: str = "trellis", time_scale: float = 1000.0):
        self.sigma_min = check_sigma_min(sigma_min)
        _check_grid_args(steps, rescale_t)
        check_option("cfg_strength", cfg_strength)
        _check_choice("cfg_convention", cfg_convention, self.CONVENTIONS)
        try:
            lo, hi = (float(v) for v in cfg_interval)
        except (TypeError, ValueError):
            raise ConfigError(f"cfg_interval: expected two numbers (lo, hi), got {cfg_interval!r}") from None
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"cfg_interval: expected 0 <= lo <= hi <= 1, got ({lo:g}, {hi:g})")
        check_option("guidance_rescale", guidance_rescale, 0.0)
        if guidance_rescale > 1:
            raise ConfigError(f"guidance_rescale: expected a factor in [0, 1], got {guidance_rescale!r}")
        _check_choice("multi_condition", multi_condition, self.MULTI)
        _check_choice("time_grid", time_grid, ("trellis", "diffusers"))
        check_option("time_scale", time_scale, 0.0, strict=True)
        self.steps, self.rescale_t = int(steps), float(rescale_t)
        self.cfg_strength, self.cfg_convention = float(cfg_strength), cfg_convention
        self.cfg_interval = (lo, hi)
        self.guidance_rescale, self.multi_condition = float(guidance_rescale), multi_condition
        self.time_grid_backend, self.time_scale = time_grid, float(time_scale)

    def __repr__(self) -> str:
        return (f"FlowEulerSampler(sigma_min={self.sigma_min:g}, steps={self.steps}, rescale_t={self.rescale_t:g}, "
                f"cfg_strength={self.cfg_strength:g}, cfg_convention={self.cfg_convention!r}, cfg_interval={self.cfg_interval}, "
                f"guidance_rescale={self.guidance_rescale:g}, multi_condition={self.multi_condition!r})")

    # ---------------------------------------------------------------------------- pieces
    @property
    def guides(self) -> bool:
        """Whether the weight asks for guidance at all (w != 0 trellis, w != 1 reconviagen)."""
        return self.cfg_strength != (0.0 if self.cfg_convention == "trellis" else 1.0)

    def times(self) -> torch.Tensor:
        """The ``(steps + 1,)`` float64 grid (:func:`time_grid`)."""
        return time_grid(self.steps, self.rescale_t, self.time_grid_backend)

    def combine(self, v_cond: torch.Tensor, v_uncond: torch.Tensor) -> torch.Tensor:
        """The guided velocity in the configured convention (each written as upstream does)."""
        w = self.cfg_strength
        if self.cfg_convention == "trellis":
            return (1 + w) * v_cond - w * v_uncond
        return w * v_cond + (1 - w) * v_uncond

    def _s(self, t: float) -> float:
        return self.sigma_min + (1.0 - self.sigma_min) * t

    def x0_from_velocity(self, x_t: State, t: float, v: State) -> State:
        """``x0 = (1 - sigma_min) x_t - s(t) v`` for one step time ``t`` (any state type)."""
        if isinstance(x_t, SparseVoxels):
            return x_t.replace(feats=self.x0_from_velocity(x_t.feats, t, v.feats if isinstance(v, SparseVoxels) else v))
        return (1 - self.sigma_min) * x_t - self._s(t) * v

    def velocity_from_x0(self, x_t: State, t: float, x0: State) -> State:
        """``v = ((1 - sigma_min) x_t - x0) / s(t)``, the inverse of :meth:`x0_from_velocity`."""
        if isinstance(x_t, SparseVoxels):
            return x_t.replace(feats=self.velocity_from_x0(x_t.feats, t, x0.feats if isinstance(x0, SparseVoxels) else x0))
        return ((1 - self.sigma_min) * x_t - x0) / self._s(t)

    def rescale(self, lay: FlowLayout, x_t: torch.Tensor, t: float, v_cond: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Guidance rescale of the flat guided velocity ``v`` (module docstring); ``phi = 0`` returns ``v``."""
        phi = self.guidance_rescale
        if phi == 0:
            return v
        x0_c = self.x0_from_velocity(x_t, t, v_cond)
        x0_g = self.x0_from_velocity(x_t, t, v)
        sd_c, sd_g = lay.std(x0_c), lay.std(x0_g)
        ok = torch.isfinite(sd_c) & torch.isfinite(sd_g) & (sd_g > 0)
        ratio = torch.where(ok, sd_c / torch.where(ok, sd_g, torch.ones_like(sd_g)), torch.ones_like(sd_g))
        x0 = phi * (x0_g * lay.expand(ratio)) + (1 - phi) * x0_g
        return self.velocity_from_x0(x_t, t, x0)

    def noise_like(self, template: State, generator: Generators = None, batch_index: torch.Tensor | None = None) -> State:
        """Standard normal initial noise of ``template``'s type and shape; a sequence of B
        generators draws object ``b``'s noise from generator ``b`` alone."""
        lay = layout_of(template, batch_index, name="template")
        return lay.wrap(randn_per_object(lay, lay.unwrap(template, "template"), generator))

    # ---------------------------------------------------------------------------- sampling
    def _conditions(self, cond: Any, neg_cond: Any, batch_size: int) -> tuple[list[Any], Any]:
        def broadcast(c: torch.Tensor) -> torch.Tensor:
            # TRELLIS repeats a batch-1 condition over the batch; a view keeps it free.
            return c.expand(batch_size, *c.shape[1:]) if c.ndim and c.shape[0] == 1 and batch_size > 1 else c

        def check(c: Any, name: str) -> Any:
            n = condition_batch_size(c)
            if n is not None and n not in (1, batch_size):
                raise ShapeError(f"{name}: expected the leading batch size {batch_size} (or 1), got {n}")
            return map_condition(broadcast, c)

        if self.multi_condition is None:
            conds = [check(cond, "cond")]
        else:
            if not isinstance(cond, (list, tuple)) or not cond:
                raise ConfigError(f"cond: multi_condition={self.multi_condition!r} expects a non-empty list of per-view conditions, got {type(cond).__name__}")
            conds = [check(c, f"cond[{i}]") for i, c in enumerate(cond)]
        if self.guides:
            if conds[0] is None:
                raise ConfigError(f"cfg_strength: guidance ({self.cfg_convention} w={self.cfg_strength:g}) needs a cond")
            neg = map_condition(torch.zeros_like, conds[0]) if neg_cond is None else check(neg_cond, "neg_cond")
        else:
            neg = None
        return conds, neg

    def sample(self, model: Callable[..., State], noise: State, cond: Any = None, neg_cond: Any = None, *,
               hook: Callable[[FlowStep], StepUpdate | None] | None = None, keep_trajectory: bool = False,
               batch_index: torch.Tensor | None = None, batch_size: int | None = None, **model_kwargs) -> FlowSample:
        """Integrate from ``noise`` (the state at t = 1) to t = 0.

        Args:
            model: ``model(x_t, t * 1000, cond, **model_kwargs) -> v`` of ``x_t``'s type and shape.
            noise: a dense ``(B, ...)`` tensor, packed rows (with ``batch_index``) or SparseVoxels.
            cond: the condition (tensors with leading batch B or 1), or a list of V of them for
                ``multi_condition``; None for an unconditional model.
            neg_cond: the negative condition for guidance (default: zeros like ``cond``).
            hook: per-step callable (module docstring, contract).
            keep_trajectory: also return every step's state and x0 prediction.
        """
        lay = layout_of(noise, batch_index, batch_size, name="noise")
        x = lay.unwrap(noise, "noise")
        B = lay.batch_size
        conds, neg = self._conditions(cond, neg_cond, B)
        grid = self.times()
        ts = grid.tolist()
        lo, hi = self.cfg_interval
        out = FlowSample(samples=noise, times=grid)

        def evaluate(state: torch.Tensor, t: float, c: Any) -> torch.Tensor:
            tt = torch.full((B,), self.time_scale * t, dtype=torch.float32, device=state.device)
            v = lay.unwrap(model(lay.wrap(state), tt, c, **model_kwargs), "model output")
            if v.shape != state.shape:
                raise ShapeError(f"model output: expected shape {tuple(state.shape)} (the state's), got {tuple(v.shape)}")
            return v

        for k in range(self.steps):
            t, t_prev = ts[k], ts[k + 1]
            with torch.no_grad():
                if self.multi_condition == "multidiffusion":
                    preds = [evaluate(x, t, c) for c in conds]
                    v_cond = sum(preds[1:], preds[0]) / len(preds)
                else:
                    v_cond = evaluate(x, t, conds[k % len(conds)])
                guided = self.guides and lo <= t <= hi
                v_uncond = evaluate(x, t, neg) if guided else None
                v = self.rescale(lay, x, t, v_cond, self.combine(v_cond, v_uncond)) if guided else v_cond
                x_prev = None
                if hook is not None:
                    x0 = self.x0_from_velocity(x, t, v)
                    step = FlowStep(k, t, t_prev, lay.wrap(x), lay.wrap(v), lay.wrap(x0), lay.wrap(v_cond),
                                    None if v_uncond is None else lay.wrap(v_uncond), guided, self)
            if hook is not None:
                with torch.enable_grad():
                    update = hook(step)
                v, x_prev = self._apply_update(lay, update, v, x)
            with torch.no_grad():
                if x_prev is None:
                    x_prev = x - (t - t_prev) * v
                if keep_trajectory:
                    out.x_t.append(lay.wrap(x_prev))
                    out.x0.append(lay.wrap(self.x0_from_velocity(x, t, v)))
            x = x_prev
        out.samples = lay.wrap(x)
        return out

    @staticmethod
    def _apply_update(lay: FlowLayout, update: Any, v: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if update is None:
            return v, None
        if not isinstance(update, StepUpdate):
            raise ConfigError(f"hook: expected None or a StepUpdate, got {type(update).__name__}")
        if (update.v is None) == (update.x_prev is None):
            raise ConfigError("hook: a StepUpdate needs exactly one of v or x_prev")
        name = "hook StepUpdate.v" if update.v is not None else "hook StepUpdate.x_prev"
        new = lay.unwrap(update.v if update.v is not None else update.x_prev, name).detach()
        if new.shape != x.shape:
            raise ShapeError(f"{name}: expected shape {tuple(x.shape)} (the state's), got {tuple(new.shape)}")
        new = new.to(x.dtype)
        return (new, None) if update.v is not None else (v, new)
