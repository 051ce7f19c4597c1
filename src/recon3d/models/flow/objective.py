"""Conditional rectified-flow (flow-matching) objective in TRELLIS's convention.

Time runs from data to noise: ``t = 0`` is data, ``t = 1`` is (almost) pure noise. With
``s(t) = sigma_min + (1 - sigma_min) * t``::

    x_t = (1 - t) * x0 + s(t) * eps                       (diffuse)
    v   = (1 - sigma_min) * eps - x0  = d x_t / d t       (target, "trellis")
    x0  = (1 - sigma_min) * x_t - s(t) * v                (x0_from_velocity)

The last line inverts the first two exactly: a model that predicts the true ``v`` gives back
``x0`` at any ``t`` (so one Euler step from ``t`` to 0 lands on ``x0``). The network receives
``t * 1000`` (``time_scale``) and is called ``model(x_t, t * 1000, cond, **kwargs)``.

What differs between the two upstream trainers (both configurable here):

============  ==========================================  ==============================================
option        TRELLIS (trainers/flow_matching)            ReconViaGen code (train_ss.py / train_slat.py)
============  ==========================================  ==============================================
t schedule    ``sigmoid(N(1, 1))`` per object             ``U(0, 1)``, one scalar per batch
CFG dropout   per object, p = 0.1, cond -> ``neg_cond``   per batch (whole condition zeroed), p = 0.1
              (zeros)
target        ``(1 - sigma_min) eps - x0``                ``(x_t - (1 - sigma_min) x0) / s(t)`` (equal
                                                          up to O(sigma_min / t); not the inverse of
                                                          ``x0_from_velocity`` when sigma_min > 0)
============  ==========================================  ==============================================

States are dense ``(B, ...)`` tensors, packed ``(N, C)`` rows with a ``batch_index``, or
:class:`~recon3d.representations.SparseVoxels`; per-object ``t`` reaches the elements through
:meth:`recon3d.models.flow.layout.FlowLayout.expand`.

Reproducibility: every random draw (``t``, the dropout coin, the noise) takes a ``generator``,
either one ``torch.Generator`` for the whole batch or a sequence of ``B`` (one per object, drawn
in the order t, coin, noise), so an object's draws do not depend on its batch neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from recon3d.errors import ConfigError, ShapeError
from recon3d.representations.voxels import SparseVoxels
from recon3d.utils.checks import check_option

from .layout import Generators, _generator_list, layout_of, randn_per_object

__all__ = ["RectifiedFlowObjective", "FlowTrainingBatch", "FlowLoss", "map_condition", "condition_batch_size"]

State = torch.Tensor | SparseVoxels


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: expected one of {list(choices)}, got {value!r}")


def check_sigma_min(sigma_min: object) -> float:
    """``sigma_min`` as a float in ``[0, 1)`` or one :class:`ConfigError` line."""
    check_option("sigma_min", sigma_min, 0.0)
    if not 0.0 <= float(sigma_min) < 1.0:
        raise ConfigError(f"sigma_min: expected a number in [0, 1), got {sigma_min!r}")
    return float(sigma_min)


# ---------------------------------------------------------------------------------- conditions
def map_condition(fn: Callable[[torch.Tensor], torch.Tensor], cond: Any) -> Any:
    """Apply ``fn`` to every tensor leaf of a condition (tensor, dict, list/tuple, nested);
    other leaves (None, numbers, strings) are kept as they are."""
    if torch.is_tensor(cond):
        return fn(cond)
    if isinstance(cond, Mapping):
        return {k: map_condition(fn, v) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(map_condition(fn, v) for v in cond)
    return cond


def _zip_condition(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: Any, b: Any, path: str = "cond") -> Any:
    if torch.is_tensor(a):
        if not torch.is_tensor(b):
            raise ShapeError(f"neg_cond{path[4:]}: expected a tensor like cond{path[4:]}, got {type(b).__name__}")
        return fn(a, b)
    if isinstance(a, Mapping):
        if not isinstance(b, Mapping) or set(a) != set(b):
            raise ShapeError(f"neg_cond{path[4:]}: expected the keys {sorted(a)} of cond{path[4:]}")
        return {k: _zip_condition(fn, a[k], b[k], f"{path}[{k!r}]") for k in a}
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            raise ShapeError(f"neg_cond{path[4:]}: expected a sequence of {len(a)} like cond{path[4:]}")
        return type(a)(_zip_condition(fn, x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    return a


def condition_batch_size(cond: Any) -> int | None:
    """Leading size of the first tensor leaf of a condition (None when it has no tensor)."""
    if torch.is_tensor(cond):
        return cond.shape[0] if cond.ndim else None
    items = cond.values() if isinstance(cond, Mapping) else cond if isinstance(cond, (list, tuple)) else ()
    for v in items:
        n = condition_batch_size(v)
        if n is not None:
            return n
    return None


# ---------------------------------------------------------------------------------- objective
@dataclass
class FlowTrainingBatch:
    """One prepared training batch (:meth:`RectifiedFlowObjective.prepare`).

    Attributes:
        x_t: noisy state, same type and shape as ``x0``.
        t: ``(B,)`` float32 times in ``[0, 1]``.
        model_t: ``(B,)`` float32 ``t * time_scale``, what the network receives.
        noise: the ``eps`` used, same type as ``x0``.
        target: the velocity to regress, same type as ``x0``.
        cond: the condition after dropout (same structure as given; None stays None).
        dropped: ``(B,)`` bool, True where the condition was replaced by ``neg_cond``.
    """

    x_t: State
    t: torch.Tensor
    model_t: torch.Tensor
    noise: State
    target: State
    cond: Any
    dropped: torch.Tensor


@dataclass
class FlowLoss:
    """``loss``: scalar MSE over every element (TRELLIS's ``F.mse_loss``); ``per_object``:
    ``(B,)`` per-object MSE (float64; NaN for an empty object), e.g. for TRELLIS's time-bin logs;
    ``batch``: the :class:`FlowTrainingBatch` it came from; ``pred``: the model output."""

    loss: torch.Tensor
    per_object: torch.Tensor
    batch: FlowTrainingBatch
    pred: State


class RectifiedFlowObjective:
    """Rectified-flow training objective (module docstring for the formulas and conventions).

    Args:
        sigma_min: the noise floor ``sigma_min`` in ``[0, 1)`` (TRELLIS: 1e-5).
        t_schedule: ``"logit_normal"`` (``t = sigmoid(N(t_mean, t_std))``, TRELLIS) or
            ``"uniform"`` (``U(0, 1)``, ReconViaGen's code).
        t_mean, t_std: parameters of the logit-normal schedule (TRELLIS configs: 1, 1).
        t_per: ``"object"`` (one ``t`` per object, TRELLIS) or ``"batch"`` (one ``t`` for the whole
            batch, ReconViaGen's ``torch.rand(1)``).
        p_uncond: probability of replacing the condition by ``neg_cond`` (0 disables dropout).
        dropout: ``"object"`` (a coin per object, TRELLIS) or ``"batch"`` (one coin, ReconViaGen).
        target: ``"trellis"`` (``(1 - sigma_min) eps - x0``) or ``"reconviagen"``
            (``(x_t - (1 - sigma_min) x0) / s(t)``, RVG's ``_get_model_gt``).
        time_scale: factor on ``t`` for the network input (1000).

    :meth:`trellis` and :meth:`reconviagen` build the two upstream settings.
    """

    T_SCHEDULES = ("logit_normal", "uniform")
    PER = ("object", "batch")
    TARGETS = ("trellis", "reconviagen")

    def __init__(self, sigma_min: float = 1e-5, t_schedule: str = "logit_normal", t_mean: float = 1.0, t_std: float = 1.0,
                 t_per: str = "object", p_uncond: float = 0.1, dropout: str = "object", target: str = "trellis",
                 time_scale: float = 1000.0):
        self.sigma_min = check_sigma_min(sigma_min)
        _check_choice("t_schedule", t_schedule, self.T_SCHEDULES)
        check_option("t_mean", t_mean)
        check_option("t_std", t_std, 0.0, strict=True)
        _check_choice("t_per", t_per, self.PER)
        check_option("p_uncond", p_uncond, 0.0)
        if p_uncond > 1:
            raise ConfigError(f"p_uncond: expected a probability in [0, 1], got {p_uncond!r}")
        _check_choice("dropout", dropout, self.PER)
        _check_choice("target", target, self.TARGETS)
        check_option("time_scale", time_scale, 0.0, strict=True)
        self.t_schedule, self.t_mean, self.t_std, self.t_per = t_schedule, float(t_mean), float(t_std), t_per
        self.p_uncond, self.dropout, self.target_kind, self.time_scale = float(p_uncond), dropout, target, float(time_scale)

    @classmethod
    def trellis(cls, **overrides) -> RectifiedFlowObjective:
        """TRELLIS's trainer: logit-normal(1, 1) per object, per-object dropout 0.1, its target."""
        return cls(**{"t_schedule": "logit_normal", "t_mean": 1.0, "t_std": 1.0, "t_per": "object",
                      "p_uncond": 0.1, "dropout": "object", "target": "trellis", **overrides})

    @classmethod
    def reconviagen(cls, **overrides) -> RectifiedFlowObjective:
        """ReconViaGen's released trainers: one uniform t per batch, per-batch dropout 0.1, its target."""
        return cls(**{"t_schedule": "uniform", "t_per": "batch", "p_uncond": 0.1, "dropout": "batch",
                      "target": "reconviagen", **overrides})

    def __repr__(self) -> str:
        return (f"RectifiedFlowObjective(sigma_min={self.sigma_min:g}, t_schedule={self.t_schedule!r}, t_mean={self.t_mean:g}, "
                f"t_std={self.t_std:g}, t_per={self.t_per!r}, p_uncond={self.p_uncond:g}, dropout={self.dropout!r}, "
                f"target={self.target_kind!r})")

    # ------------------------------------------------------------------------------ pieces
    def _s(self, t):
        return self.sigma_min + (1.0 - self.sigma_min) * t

    def _uniforms(self, batch_size: int, per: str, generator: Generators) -> torch.Tensor:
        """``(B,)`` float64 U(0, 1) on the CPU: one per object (from each object's generator) or
        one for all (``per == "batch"``; the first generator of a list)."""
        gens = _generator_list(generator, batch_size)
        if batch_size == 0:
            return torch.zeros(0, dtype=torch.float64)
        if per == "batch":
            g = gens[0] if gens else generator
            dev = g.device if isinstance(g, torch.Generator) else "cpu"
            return torch.rand(1, generator=g, device=dev, dtype=torch.float64).cpu().expand(batch_size).clone()
        if gens is None:
            dev = generator.device if isinstance(generator, torch.Generator) else "cpu"
            return torch.rand(batch_size, generator=generator, device=dev, dtype=torch.float64).cpu()
        return torch.cat([torch.rand(1, generator=g, device=g.device, dtype=torch.float64).cpu() for g in gens]) if gens else torch.zeros(0, dtype=torch.float64)

    def sample_t(self, batch_size: int, generator: Generators = None, device: torch.device | str | None = None) -> torch.Tensor:
        """``(B,)`` float32 training times (``t_schedule``, ``t_per``).

        Logit-normal draws ``u ~ U(0, 1)`` and maps it through the normal quantile, so it consumes
        one uniform per object like the uniform schedule (a per-object generator list then gives
        each object the same stream position whichever schedule is chosen).
        """
        check_option("batch_size", batch_size, 0, integer=True)
        u = self._uniforms(batch_size, self.t_per, generator)
        if self.t_schedule == "uniform":
            t = u
        else:
            # Clamp away from 0/1 so erfinv stays finite; 1e-12 is far below float32 resolution of t.
            z = math.sqrt(2.0) * torch.erfinv(2.0 * u.clamp(1e-12, 1 - 1e-12) - 1.0)
            t = torch.sigmoid(z * self.t_std + self.t_mean)
        return t.to(device=device, dtype=torch.float32)

    def drop_mask(self, batch_size: int, generator: Generators = None) -> torch.Tensor:
        """``(B,)`` bool CPU mask of objects whose condition is dropped (``p_uncond``, ``dropout``)."""
        if self.p_uncond <= 0:
            # No draw at all: turning dropout off must not shift the generators' streams of the noise.
            return torch.zeros(batch_size, dtype=torch.bool)
        return self._uniforms(batch_size, self.dropout, generator) < self.p_uncond

    @staticmethod
    def apply_dropout(cond: Any, mask: torch.Tensor, neg_cond: Any = None) -> Any:
        """``cond`` with object ``b`` replaced by ``neg_cond``'s row ``b`` where ``mask[b]``
        (default ``neg_cond``: zeros, as TRELLIS and ReconViaGen). Every tensor leaf needs the
        leading batch size ``B`` (a leaf of batch 1 in ``neg_cond`` broadcasts)."""
        if cond is None or not bool(mask.any()):
            return cond
        if neg_cond is None:
            neg_cond = map_condition(torch.zeros_like, cond)
        B = mask.shape[0]

        def pick(c: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
            if c.ndim == 0 or c.shape[0] != B:
                raise ShapeError(f"cond: expected every tensor to have the leading batch size {B}, got {tuple(c.shape)}")
            m = mask.to(c.device).view(-1, *([1] * (c.ndim - 1)))
            return torch.where(m, n.to(c.dtype), c)

        return _zip_condition(pick, cond, neg_cond)

    def diffuse(self, x0: State, t: torch.Tensor | float, noise: State, batch_index: torch.Tensor | None = None) -> State:
        """``x_t = (1 - t) x0 + s(t) eps``; ``t`` a float or ``(B,)`` per object; same type as ``x0``."""
        lay = layout_of(x0, batch_index, name="x0")
        f = lay.unwrap(x0, "x0")
        e = lay.unwrap(noise, "noise", f)
        tb = _as_dtype(lay.expand(_as_t(t, f)), f)
        return lay.wrap((1 - tb) * f + self._s(tb) * e)

    def target(self, x0: State, noise: State, t: torch.Tensor | float | None = None, x_t: State | None = None,
               batch_index: torch.Tensor | None = None) -> State:
        """The regression target ``v`` (``target`` option); ``t`` is needed for ``"reconviagen"`` only."""
        lay = layout_of(x0, batch_index, name="x0")
        f = lay.unwrap(x0, "x0")
        e = lay.unwrap(noise, "noise", f)
        if self.target_kind == "trellis":
            return lay.wrap((1 - self.sigma_min) * e - f)
        if t is None:
            raise ConfigError("target: the 'reconviagen' target needs t")
        tb = _as_dtype(lay.expand(_as_t(t, f)), f)
        xt = lay.unwrap(x_t, "x_t", f) if x_t is not None else (1 - tb) * f + self._s(tb) * e
        return lay.wrap((xt - (1 - self.sigma_min) * f) / self._s(tb))

    def x0_from_velocity(self, x_t: State, t: torch.Tensor | float, v: State, batch_index: torch.Tensor | None = None) -> State:
        """``x0 = (1 - sigma_min) x_t - s(t) v`` (exact inverse of the "trellis" target)."""
        lay = layout_of(x_t, batch_index, name="x_t")
        f = lay.unwrap(x_t, "x_t")
        vf = lay.unwrap(v, "v", f)
        tb = _as_dtype(lay.expand(_as_t(t, f)), f)
        return lay.wrap((1 - self.sigma_min) * f - self._s(tb) * vf)

    def velocity_from_x0(self, x_t: State, t: torch.Tensor | float, x0: State, batch_index: torch.Tensor | None = None) -> State:
        """``v = ((1 - sigma_min) x_t - x0) / s(t)``, the inverse of :meth:`x0_from_velocity`."""
        lay = layout_of(x_t, batch_index, name="x_t")
        f = lay.unwrap(x_t, "x_t")
        xf = lay.unwrap(x0, "x0", f)
        tb = _as_dtype(lay.expand(_as_t(t, f)), f)
        return lay.wrap(((1 - self.sigma_min) * f - xf) / self._s(tb))

    # ------------------------------------------------------------------------------ training
    def prepare(self, x0: State, cond: Any = None, neg_cond: Any = None, generator: Generators = None,
                batch_index: torch.Tensor | None = None, batch_size: int | None = None) -> FlowTrainingBatch:
        """Draw ``t`` (then the dropout coin, then the noise) and build ``x_t``, the target and the
        dropped-out condition for a batch ``x0`` (dense, packed with ``batch_index``, or SparseVoxels)."""
        lay = layout_of(x0, batch_index, batch_size, name="x0")
        f = lay.unwrap(x0, "x0")
        B = lay.batch_size
        if cond is not None:
            n = condition_batch_size(cond)
            if n is not None and n != B:
                raise ShapeError(f"cond: expected the leading batch size {B} of x0, got {n}")
        gens = _generator_list(generator, B)
        if gens is None:
            t = self.sample_t(B, generator, device=f.device)
            mask = self.drop_mask(B, generator)
            noise = randn_per_object(lay, f, generator)
        else:
            # Object b's draws come from generator b alone, in a fixed order (t, coin, noise); a
            # per-batch t or coin comes from the first generator, still before its noise.
            t = self.sample_t(B, gens, device=f.device) if self.t_per == "batch" else None
            mask = self.drop_mask(B, gens) if self.dropout == "batch" else None
            ts, coins = [], []
            for g in gens:
                if t is None:
                    ts.append(self.sample_t(1, [g]))
                if mask is None:
                    coins.append(self.drop_mask(1, [g]))
            t = torch.cat(ts).to(f.device) if t is None else t
            mask = torch.cat(coins) if mask is None else mask
            noise = randn_per_object(lay, f, gens)
        tb = lay.expand(t).to(f.dtype)
        x_t = (1 - tb) * f + self._s(tb) * noise
        if self.target_kind == "trellis":
            target = (1 - self.sigma_min) * noise - f
        else:
            target = (x_t - (1 - self.sigma_min) * f) / self._s(tb)
        cond = self.apply_dropout(cond, mask, neg_cond)
        return FlowTrainingBatch(lay.wrap(x_t), t, t * self.time_scale, lay.wrap(noise), lay.wrap(target), cond, mask)

    def loss(self, model: Callable[..., State], x0: State, cond: Any = None, neg_cond: Any = None,
             generator: Generators = None, batch_index: torch.Tensor | None = None, batch_size: int | None = None,
             **model_kwargs) -> FlowLoss:
        """MSE between ``model(x_t, t * time_scale, cond, **model_kwargs)`` and the target."""
        batch = self.prepare(x0, cond, neg_cond, generator, batch_index, batch_size)
        lay = layout_of(x0, batch_index, batch_size, name="x0")
        pred = model(batch.x_t, batch.model_t, batch.cond, **model_kwargs)
        p = lay.unwrap(pred, "model output")
        tgt = lay.unwrap(batch.target, "target")
        if p.shape != tgt.shape:
            raise ShapeError(f"model output: expected shape {tuple(tgt.shape)} (the state's), got {tuple(p.shape)}")
        err = (p - tgt).square()
        return FlowLoss(err.mean(), lay.mean(err.detach()), batch, pred)


def _as_t(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    if torch.is_tensor(t):
        if t.ndim == 0:
            return float(t)
        return t.to(like.device)
    return float(t)


def _as_dtype(tb, like: torch.Tensor):
    return tb.to(like.dtype) if torch.is_tensor(tb) else tb
