"""Per-view cross-attention for TRELLIS's flows: one cross-attention per view, combined per block.

ReconViaGen conditions each SLAT-flow block on ``N`` per-view token lists ``ctx_i`` (paper
§4.2.3.1). Two ways of combining the ``N`` cross-attention results ``a_i = CA(LN2(x), ctx_i)``:

* ``mode="weighted"`` (the paper, default): ``x += sum_i w_i a_i`` with ``w_i = sigmoid(MLP(a_i))``
  in ``[0, 1]``, a small MLP (``view_weight``: Linear(C, hidden), GELU-tanh, Linear(hidden, 1))
  on each result. The paper calls ``w_i`` "a scalar computed for each view" from "the
  corresponding cross-attention result"; with ``weight_pool="token"`` (default) the MLP sees each
  query token's (voxel's) result, so every token gets its own weight per view; with
  ``weight_pool="object"`` the result is first averaged over each object's tokens, giving one
  scalar per view and object. The weights are not normalised over views (the paper's sum).
  The MLP's last layer starts at zero weight and bias ``weight_init_bias`` (0 -> ``w = 0.5``).
* ``mode="mean"`` (the official code, ``x += sum_i CA(LN2(x), ctx_i) / N``): no parameters added;
  ``N`` identical views give exactly the single-view block.

:func:`install_per_view_conditioning` turns an existing flow model (TRELLIS's dense SS flow or
sparse SLAT flow, or anything whose blocks hold a ``cross_attn`` of recon3d's dense
:class:`~recon3d.models.trellis.modules.MultiHeadAttention` or sparse
:class:`~recon3d.models.sparse.SparseMultiHeadAttention`) into a per-view one without editing its
code: each block's ``cross_attn`` is replaced by a :class:`MultiViewCrossAttention` subclass of the
same attention class holding the *same* projection modules (so the state-dict keys
``blocks.{i}.cross_attn.{to_q,to_kv,to_out,...}`` and the parameter objects are unchanged, peft's
LoRA finds ``to_q``/``to_kv``/``to_out`` where it did, official TRELLIS weights still load), plus
``blocks.{i}.cross_attn.view_weight.{0,2}.*`` in weighted mode. Load TRELLIS weights before
installing, or load with ``strict=False`` (only the ``view_weight`` keys are then missing).

How per-view contexts reach the blocks: the flows' ``forward(x, t, cond)`` check ``cond`` is
``(B, L, C)``. The installed forward pre-hook accepts ``cond (B, N, T, C)`` (or a list of ``N``
``(B, T, C)``, the official layout), packs it to ``(B, N T, C)`` and tells every installed
attention ``num_views = N``; each attention splits the packed context back into its ``N`` views.
A 3-D ``cond`` sets ``num_views = None``: one view. The count is kept until the next forward, so
gradient checkpointing (recompute in backward) sees the same ``N`` — as long as backward runs
before the next forward with a different ``N``.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Sequence

import torch
import torch.nn as nn

from recon3d.errors import ConfigError, ShapeError
from recon3d.models.sparse import SparseMultiHeadAttention
from recon3d.models.trellis.modules import MultiHeadAttention
from recon3d.representations import SparseVoxels

__all__ = ["MultiViewCrossAttention", "MultiViewDenseCrossAttention", "MultiViewSparseCrossAttention",
           "install_per_view_conditioning", "pack_per_view_context", "per_view_attentions", "PER_VIEW_MODES"]

PER_VIEW_MODES = ("weighted", "mean")
_POOLS = ("token", "object")


def pack_per_view_context(cond) -> tuple[torch.Tensor, int | None]:
    """``(B, N, T, C)`` or a list of ``N`` ``(B, T, C)`` -> ``((B, N T, C), N)``; ``(B, T, C)`` -> ``(cond, None)``."""
    if isinstance(cond, (list, tuple)):
        if not cond or any(not isinstance(c, torch.Tensor) or c.ndim != 3 or c.shape != cond[0].shape for c in cond):
            shapes = [list(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__ for c in cond]
            raise ShapeError(f"cond: a per-view list must hold N >= 1 tensors (B, T, C) of one shape to pass through the "
                             f"flow's forward, got {shapes} (call the attention directly for views of different lengths)")
        cond = torch.stack(list(cond), dim=1)
    if not isinstance(cond, torch.Tensor):
        raise ShapeError(f"cond: expected a (B, T, C) or per-view (B, N, T, C) tensor, got {type(cond).__name__}")
    if cond.ndim == 4:
        B, N, T, C = cond.shape
        return cond.reshape(B, N * T, C), N
    return cond, None


class MultiViewCrossAttention(nn.Module):
    """Mixin over a cross-attention class: ``forward(x, context)`` runs the wrapped attention once
    per view and combines the results (module docstring). Use the concrete
    :class:`MultiViewDenseCrossAttention` / :class:`MultiViewSparseCrossAttention`, or
    :meth:`from_attention` on an existing attention.

    ``context``: ``(B, N, T, C)``, a list of ``N`` ``(B, T_i, C)`` (lengths may differ), or
    ``(B, L, C)`` — ``N = num_views`` packed views of ``L / N`` tokens (set by the flow's hook), or
    one view when ``num_views`` is None. A :class:`SparseVoxels` context is one view.
    """

    mode: str
    num_views: int | None

    def _init_multiview(self, mode: str, weight_hidden: int | None, weight_pool: str, weight_init_bias: float) -> None:
        if mode not in PER_VIEW_MODES:
            raise ConfigError(f"mode: expected one of {PER_VIEW_MODES} (paper 'weighted', official 'mean'), got {mode!r}")
        if weight_pool not in _POOLS:
            raise ConfigError(f"weight_pool: expected one of {_POOLS}, got {weight_pool!r}")
        self.mode, self.weight_pool, self.num_views = mode, weight_pool, None
        if mode == "weighted":
            C = self.to_out.out_features
            hidden = max(C // 4, 1) if weight_hidden is None else int(weight_hidden)
            if hidden < 1:
                raise ConfigError(f"weight_hidden: expected a positive MLP width, got {weight_hidden!r}")
            w = self.to_out.weight
            self.view_weight = nn.Sequential(nn.Linear(C, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, 1))
            nn.init.zeros_(self.view_weight[2].weight)
            nn.init.constant_(self.view_weight[2].bias, float(weight_init_bias))
            self.view_weight.to(device=w.device, dtype=w.dtype)

    @classmethod
    def from_attention(cls, attn: nn.Module, mode: str = "weighted", weight_hidden: int | None = None,
                       weight_pool: str = "token", weight_init_bias: float = 0.0) -> MultiViewCrossAttention:
        """A per-view module sharing ``attn``'s projection modules and settings (``attn`` itself is
        left as it was; its parent should drop it)."""
        target = {MultiHeadAttention: MultiViewDenseCrossAttention, SparseMultiHeadAttention: MultiViewSparseCrossAttention}
        sub = target.get(type(attn))
        if sub is None:
            raise ConfigError(f"cross_attn: expected recon3d's MultiHeadAttention or SparseMultiHeadAttention, got {type(attn).__name__}")
        if getattr(attn, "_type", getattr(attn, "type", None)) != "cross":
            raise ConfigError(f"cross_attn: expected a cross-attention (type 'cross'), got type {getattr(attn, 'type', '?')!r}")
        new = sub.__new__(sub)
        # Same attribute values; own copies of the registries (modules, parameters, buffers, hooks), so
        # the new module holds the very same child modules without aliasing the old one's dicts.
        new.__dict__.update({k: (copy.copy(v) if isinstance(v, (dict, set)) else v) for k, v in attn.__dict__.items()})
        new._init_multiview(mode, weight_hidden, weight_pool, weight_init_bias)
        return new

    # --------------------------------------------------------------------------------- views
    def split_views(self, context) -> list:
        if isinstance(context, (list, tuple)):
            if not context:
                raise ShapeError("context: expected at least one view")
            return list(context)
        if isinstance(context, SparseVoxels):
            return [context]
        if not isinstance(context, torch.Tensor) or context.ndim not in (3, 4):
            got = list(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise ShapeError(f"context: expected (B, T, C), (B, N, T, C) or a list of (B, T, C), got {got}")
        if context.ndim == 4:
            return list(context.unbind(1))
        n = self.num_views or 1
        if context.shape[1] % n:
            raise ShapeError(f"context: {context.shape[1]} packed tokens do not split into num_views={n} equal views")
        return list(context.chunk(n, dim=1)) if n > 1 else [context]

    def _pool(self, feats: torch.Tensor, x) -> torch.Tensor:
        """Each object's mean result broadcast back to its tokens (``weight_pool='object'``)."""
        if isinstance(x, SparseVoxels):
            b = x.coords[:, 0].long()
            sums = feats.new_zeros(x.batch_size, feats.shape[-1]).index_add_(0, b, feats)
            return (sums / x.counts.to(feats).clamp_min(1)[:, None]).index_select(0, b)
        return feats.mean(dim=1, keepdim=True).expand_as(feats)

    def view_weights(self, feats: torch.Tensor, x) -> torch.Tensor:
        """``w = sigmoid(MLP(a))`` in [0, 1] for one view's result ``feats`` (``(..., C)`` -> ``(..., 1)``)."""
        h = self._pool(feats, x) if self.weight_pool == "object" else feats
        return torch.sigmoid(self.view_weight(h).float()).to(feats.dtype)

    def combine(self, x, context, return_weights: bool = False):
        """Per-view attention results combined (``forward``); with ``return_weights`` also the
        ``N`` weights ``(..., 1)`` (weighted mode; None in mean mode)."""
        views = self.split_views(context)
        total, weights = None, []
        for ctx in views:
            out = super().forward(x, ctx)
            f = out.feats if isinstance(out, SparseVoxels) else out
            if self.mode == "weighted":
                w = self.view_weights(f, x)
                weights.append(w)
                f = w * f
            total = f if total is None else total + f
        if self.mode == "mean":
            total = total / len(views)
        res = out.replace(feats=total) if isinstance(out, SparseVoxels) else total
        return (res, weights if self.mode == "weighted" else None) if return_weights else res

    def forward(self, x, context=None):
        """``x``: queries (dense ``(B, L, C)`` or :class:`SparseVoxels`); ``context``: per-view
        contexts (class docstring) -> the wrapped attention's output type, combined over views."""
        if context is None:
            raise ShapeError("context: per-view cross-attention needs a context")
        return self.combine(x, context)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, weight_pool={self.weight_pool!r}"


class MultiViewDenseCrossAttention(MultiViewCrossAttention, MultiHeadAttention):
    """Per-view cross-attention over dense ``(B, L, C)`` queries (TRELLIS's SS flow blocks)."""

    def __init__(self, channels: int, num_heads: int, ctx_channels: int | None = None, qkv_bias: bool = True,
                 qk_rms_norm: bool = False, mode: str = "weighted", weight_hidden: int | None = None,
                 weight_pool: str = "token", weight_init_bias: float = 0.0):
        MultiHeadAttention.__init__(self, channels, num_heads, ctx_channels=ctx_channels, type="cross", qkv_bias=qkv_bias,
                                    qk_rms_norm=qk_rms_norm)
        self._init_multiview(mode, weight_hidden, weight_pool, weight_init_bias)


class MultiViewSparseCrossAttention(MultiViewCrossAttention, SparseMultiHeadAttention):
    """Per-view cross-attention over :class:`SparseVoxels` queries (TRELLIS's SLAT flow blocks)."""

    def __init__(self, channels: int, num_heads: int, ctx_channels: int | None = None, qkv_bias: bool = True,
                 qk_rms_norm: bool = False, backend: str = "auto", mode: str = "weighted", weight_hidden: int | None = None,
                 weight_pool: str = "token", weight_init_bias: float = 0.0):
        SparseMultiHeadAttention.__init__(self, channels, num_heads, ctx_channels=ctx_channels, type="cross", attn_mode="full",
                                          qkv_bias=qkv_bias, qk_rms_norm=qk_rms_norm, backend=backend)
        self._init_multiview(mode, weight_hidden, weight_pool, weight_init_bias)


# ------------------------------------------------------------------------------------ install
def _pack_cond_hook(cond_index: int, module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of an installed flow: per-view ``cond`` -> packed ``(B, N T, C)`` + ``num_views``."""
    if "cond" in kwargs:
        packed, n = pack_per_view_context(kwargs["cond"])
        kwargs = {**kwargs, "cond": packed}
    elif len(args) > cond_index:
        packed, n = pack_per_view_context(args[cond_index])
        args = args[:cond_index] + (packed,) + args[cond_index + 1:]
    else:
        return None
    for m in module.modules():
        if isinstance(m, MultiViewCrossAttention):
            m.num_views = n
    return args, kwargs


def install_per_view_conditioning(flow_model: nn.Module, mode: str = "weighted", weight_hidden: int | None = None,
                                  weight_pool: str = "token", weight_init_bias: float = 0.0,
                                  attribute: str = "cross_attn") -> nn.Module:
    """Make every ``<attribute>`` cross-attention of ``flow_model`` per-view (module docstring); returns ``flow_model``.

    Args:
        flow_model: a TRELLIS flow (:class:`~recon3d.models.trellis.SLatFlowModel` or
            :class:`~recon3d.models.trellis.SparseStructureFlowModel`) or any module whose
            ``forward`` has a ``cond`` argument and whose submodules hold ``attribute`` attentions.
        mode: ``"weighted"`` (paper) or ``"mean"`` (official).
        weight_hidden, weight_pool, weight_init_bias: the weight MLP (weighted mode; see :class:`MultiViewCrossAttention`).
        attribute: the child name of the cross-attentions to replace.
    """
    if mode not in PER_VIEW_MODES:
        raise ConfigError(f"mode: expected one of {PER_VIEW_MODES} (paper 'weighted', official 'mean'), got {mode!r}")
    if any(isinstance(m, MultiViewCrossAttention) for m in flow_model.modules()):
        raise ConfigError(f"flow_model: per-view conditioning is already installed on this {type(flow_model).__name__}")
    try:
        params = list(inspect.signature(flow_model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    if "cond" not in params:
        raise ConfigError(f"flow_model: expected a forward(..., cond, ...) argument named 'cond', {type(flow_model).__name__}.forward has {params}")
    parents = [m for m in flow_model.modules() if isinstance(getattr(m, "_modules", {}).get(attribute), (MultiHeadAttention, SparseMultiHeadAttention))]
    if not parents:
        raise ConfigError(f"flow_model: no '{attribute}' attention (MultiHeadAttention / SparseMultiHeadAttention) found in "
                          f"{type(flow_model).__name__}")
    for parent in parents:
        setattr(parent, attribute, MultiViewCrossAttention.from_attention(
            getattr(parent, attribute), mode, weight_hidden, weight_pool, weight_init_bias))
    flow_model.register_forward_pre_hook(functools.partial(_pack_cond_hook, params.index("cond")), with_kwargs=True)
    return flow_model


def per_view_attentions(flow_model: nn.Module) -> Sequence[MultiViewCrossAttention]:
    """The installed per-view attentions of ``flow_model``, in module order."""
    return [m for m in flow_model.modules() if isinstance(m, MultiViewCrossAttention)]
