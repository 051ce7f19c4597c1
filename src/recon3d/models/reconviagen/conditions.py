"""ReconViaGen's condition nets: VGGT features -> condition tokens for TRELLIS's flows (paper §4.2.2).

Inputs are the VGGT aggregator's per-layer outputs (:class:`recon3d.models.vggt.aggregator.Aggregator`):
a list of ``depth`` tensors ``[B, S, P, Cv]`` (``Cv = 2 C_vggt``, frame ‖ global; 2048 at VGGT-1B),
``P = patch_start_idx + Np`` with ``patch_start_idx = 5`` special tokens (1 camera + 4 registers)
in front of the ``Np`` patch tokens of each view. Optionally DINOv2 tokens ``[B, S, Pd, Cd]`` of the
same views (TRELLIS's layer-normed ``x_prenorm``: 1 cls + 4 registers + patches).

* :class:`GlobalGeometryCondition` (GGC, §4.2.2.1; upstream ``ModulatedMultiViewCond`` of
  ``trellis/models/sparse_structure_flow.py`` in GAP-LAB-CUHK-SZ/ReconViaGen @ f672092): one
  learned token list ``multiview_cond_tokens (1, T, C)`` (official ``(1, 4096, 1024)``, init
  N(0, 1e-6^2)) refined by one :class:`ConditionFusionBlock` per VGGT layer ``L_k`` of ``layers``
  (official ``[4, 11, 17, 23]``); block ``k`` cross-attends to the patch tokens of that layer of
  *all* views concatenated along the token axis, ``(B, S Np, Cv [+ Cd])``. Output ``(B, T, C)``,
  the condition of every SS-flow block. Its unconditional branch is zeros of the output
  (:func:`null_condition`).
* :class:`PerViewCondition` (PVC, §4.2.2.2, the paper's version, default): the same kind of
  net run per view: a learned token list (shared by all views, since the number of views varies)
  fused with *that view's* layer-``L_k`` patch tokens. Output ``(B, S, T, C)``: one token list per
  view, combined inside each SLAT-flow block by :class:`~recon3d.models.reconviagen.multiview_cross_attention.MultiViewCrossAttention`.
* :class:`LinearPerViewCondition` (the official code's PVC, upstream ``ModulatedSLATMultiViewCond`` of
  ``trellis/models/structured_latent_flow.py``): no token list and no attention: ``c_0 = DINO``
  (all ``Pd`` tokens of the view), then for each of the 4 layers ``c <- ReLU(Linear(Cv + C -> C)(VGGT_Lk ‖ c)) + DINO``
  over *all* ``P`` tokens of the view (VGGT's camera/register tokens line up with DINO's
  cls/register tokens, so ``P`` must equal ``Pd``). Output ``(B, S, P, C)``.

State-dict names follow upstream so official condition-net weights load strictly (checked by
``tests/fixtures/reconviagen/official_manifest.json``, written by ``scripts/make_reconviagen_manifest.py``
from upstream's own classes)::

    GGC:  multiview_cond_tokens (1, T, C)
          cond_blocks.{k}.norm2.{weight,bias}                       (the only affine norm)
          cond_blocks.{k}.self_attn.to_qkv.*, .self_attn.{q,k}_rms_norm.gamma (H, C/H), .self_attn.to_out.*
          cond_blocks.{k}.cross_attn.to_q.*, .cross_attn.to_kv.* (2C, Cctx), .cross_attn.to_out.*
          cond_blocks.{k}.mlp.mlp.{0,2}.*                           Linear(C, 4C), Linear(4C, C)
    official PVC: linear_blocks.{k}.0.{weight,bias}                 Linear(Cv + C, C)
    paper PVC:    view_cond_tokens (1, T, C) + cond_blocks.* as GGC (no upstream counterpart)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from recon3d.errors import ConfigError, ShapeError
from recon3d.models.trellis.modules import (
    FeedForwardNet,
    LayerNorm32,
    MultiHeadAttention,
    convert_module_to_f16,
    convert_module_to_f32,
)

__all__ = [
    "ConditionFusionBlock", "GlobalGeometryCondition", "PerViewCondition", "LinearPerViewCondition",
    "null_condition", "condition_dropout", "VGGT_CONDITION_LAYERS",
]

#: The VGGT layers the official condition nets read (VGGT-1B has 24).
VGGT_CONDITION_LAYERS = (4, 11, 17, 23)


def null_condition(cond: torch.Tensor) -> torch.Tensor:
    """The unconditional branch of classifier-free guidance: zeros shaped as the condition net's
    *output* (GGC ``(B, T, C)``, PVC ``(B, S, T, C)``), as ReconViaGen's ``neg_cond``."""
    return torch.zeros_like(cond)


def condition_dropout(cond: torch.Tensor, p: float, per_batch: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace the condition of each sample by :func:`null_condition` with probability ``p``.

    ``cond (B, ...)``. ``per_batch=False`` (default) draws one decision per sample; ``True`` is
    the official training code's choice: one draw for the whole batch (``random.random() < p``
    zeroes every sample's condition at once). The paper (§5.4) gives the rate (0.3), not the unit.
    """
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"p: expected a condition drop probability in [0, 1], got {p!r}")
    if p == 0.0:
        return cond
    n = 1 if per_batch else cond.shape[0]
    keep = torch.rand(n, generator=generator, device="cpu" if generator is not None else cond.device) >= p
    keep = keep.to(cond.device).reshape(n, *([1] * (cond.ndim - 1)))
    return cond * keep.to(cond.dtype)


# ------------------------------------------------------------------------------------- blocks
class ConditionFusionBlock(nn.Module):
    """One condition-net block: self-attention over the tokens, cross-attention to the features, MLP.

    ``x += SA(LN1(x))`` (LN1 non-affine; queries/keys per-head RMS-normed with ``qk_rms_norm``),
    ``x += CA(LN2(x), ctx)`` (LN2 affine), ``x += MLP(LN3(x))`` (LN3 non-affine; ``Linear(C, rC)``,
    GELU-tanh, ``Linear(rC, C)``); every LN has eps 1e-6 and computes in float32. No timestep,
    no adaLN modulation, no gates (upstream ``ModulatedTransformerCrossBlock_woT``).

    Args:
        channels: token width ``C``; ctx_channels: feature width ``Cctx``; num_heads: ``H``.
        mlp_ratio: MLP hidden width / ``C``. qk_rms_norm / qk_rms_norm_cross: RMS norm of q/k in
            the self / cross attention (official: True / False). use_checkpoint: recompute in backward.
    """

    def __init__(self, channels: int, ctx_channels: int, num_heads: int, mlp_ratio: float = 4.0,
                 qk_rms_norm: bool = True, qk_rms_norm_cross: bool = False, qkv_bias: bool = True,
                 use_checkpoint: bool = False):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = MultiHeadAttention(channels, num_heads, type="self", qkv_bias=qkv_bias, qk_rms_norm=qk_rms_norm)
        self.cross_attn = MultiHeadAttention(channels, num_heads, ctx_channels=ctx_channels, type="cross",
                                             qkv_bias=qkv_bias, qk_rms_norm=qk_rms_norm_cross)
        self.mlp = FeedForwardNet(channels, mlp_ratio)

    def _forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context)
        return x + self.mlp(self.norm3(x))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``x (B, T, C)``, ``context (B, L, Cctx)`` -> ``(B, T, C)``."""
        if self.use_checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)


# ------------------------------------------------------------------------------ input helpers
def _check_layers(layers: Sequence[int]) -> tuple[int, ...]:
    layers = tuple(int(i) for i in layers)
    if not layers or any(i < 0 for i in layers):
        raise ConfigError(f"layers: expected a non-empty list of VGGT layer indices >= 0, got {list(layers)}")
    return layers


def _layer_tokens(vggt_tokens: Sequence[torch.Tensor], layer: int, channels: int) -> torch.Tensor:
    """Layer ``layer`` of the aggregator outputs, checked to be ``[B, S, P, channels]``."""
    if not isinstance(vggt_tokens, (list, tuple)) or len(vggt_tokens) <= layer:
        n = len(vggt_tokens) if isinstance(vggt_tokens, (list, tuple)) else type(vggt_tokens).__name__
        raise ShapeError(f"vggt_tokens: expected a list of the VGGT aggregator's per-layer outputs with more than "
                         f"{layer} entries (layer {layer} is read), got {n} entries")
    x = vggt_tokens[layer]
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[-1] != channels:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ShapeError(f"vggt_tokens[{layer}]: expected [B, S, P, {channels}] aggregator tokens, got {got}")
    return x


def _dino_patches(dino_tokens: torch.Tensor | None, channels: int, prefix: int, ref: torch.Tensor) -> torch.Tensor | None:
    """``[B, S, Pd, Cd]`` DINO tokens without their ``prefix`` leading tokens, checked against the
    VGGT patch tokens ``ref [B, S, Np, ·]``; None when the net takes no DINO channels."""
    if channels == 0:
        if dino_tokens is not None:
            raise ShapeError("dino_tokens: this condition net was built with dino_channels=0 and takes none")
        return None
    if dino_tokens is None:
        raise ShapeError(f"dino_tokens: required [B, S, Pd, {channels}] DINOv2 tokens (built with dino_channels={channels})")
    if dino_tokens.ndim != 4 or dino_tokens.shape[-1] != channels:
        raise ShapeError(f"dino_tokens: expected [B, S, Pd, {channels}], got {list(dino_tokens.shape)}")
    d = dino_tokens[:, :, prefix:]
    if d.shape[:3] != ref.shape[:3]:
        raise ShapeError(f"dino_tokens: after dropping {prefix} leading tokens expected [B, S, Np] = {list(ref.shape[:3])} "
                         f"(the VGGT patch tokens of the same views), got {list(d.shape[:3])}")
    return d


class _TokenListCondition(nn.Module):
    """Shared machinery of the two attention condition nets (a learned token list + fusion blocks)."""

    tokens_name = "multiview_cond_tokens"

    def __init__(self, channels: int, vggt_channels: int, dino_channels: int, num_tokens: int, num_heads: int,
                 mlp_ratio: float, layers: Sequence[int], patch_start_idx: int, dino_prefix_tokens: int,
                 qk_rms_norm: bool, qk_rms_norm_cross: bool, init_std: float, use_checkpoint: bool, use_fp16: bool):
        super().__init__()
        if channels <= 0 or num_tokens <= 0 or vggt_channels <= 0 or dino_channels < 0:
            raise ConfigError(f"channels/num_tokens/vggt_channels must be > 0 and dino_channels >= 0, got "
                              f"{channels}/{num_tokens}/{vggt_channels}/{dino_channels}")
        if channels % num_heads:
            raise ConfigError(f"num_heads: expected a divisor of channels {channels}, got {num_heads!r}")
        self.layers = _check_layers(layers)
        self.channels, self.vggt_channels, self.dino_channels = channels, vggt_channels, dino_channels
        self.ctx_channels = vggt_channels + dino_channels
        self.num_tokens, self.num_heads = num_tokens, num_heads
        self.patch_start_idx, self.dino_prefix_tokens = patch_start_idx, dino_prefix_tokens
        tokens = nn.Parameter(torch.empty(1, num_tokens, channels))
        if not tokens.is_meta:  # shapes only on meta (and normal_ there loads torch's python refs: seconds)
            nn.init.normal_(tokens, std=init_std)
        self.register_parameter(self.tokens_name, tokens)
        self.cond_blocks = nn.ModuleList([
            ConditionFusionBlock(channels, self.ctx_channels, num_heads, mlp_ratio, qk_rms_norm=qk_rms_norm,
                                 qk_rms_norm_cross=qk_rms_norm_cross, use_checkpoint=use_checkpoint)
            for _ in self.layers
        ])
        self.use_fp16 = False
        if use_fp16:
            self.convert_to_fp16()

    @property
    def dtype(self) -> torch.dtype:
        return self.cond_blocks[0].cross_attn.to_q.weight.dtype

    def convert_to_fp16(self) -> None:
        """Linear weights of the blocks and the token list to float16 (upstream's ``convert_to_fp16``)."""
        self.use_fp16 = True
        self.cond_blocks.apply(convert_module_to_f16)
        getattr(self, self.tokens_name).data = getattr(self, self.tokens_name).data.half()

    def convert_to_fp32(self) -> None:
        self.use_fp16 = False
        self.cond_blocks.apply(convert_module_to_f32)
        getattr(self, self.tokens_name).data = getattr(self, self.tokens_name).data.float()

    def _contexts(self, vggt_tokens: Sequence[torch.Tensor], dino_tokens: torch.Tensor | None,
                  patch_start_idx: int | None) -> list[torch.Tensor]:
        """Per block: ``[B, S, Np, Cctx]`` = layer ``L_k`` patch tokens (‖ DINO patch tokens)."""
        ps = self.patch_start_idx if patch_start_idx is None else int(patch_start_idx)
        _layer_tokens(vggt_tokens, max(self.layers), self.vggt_channels)  # the list is long enough
        out, dino = [], None
        for k, layer in enumerate(self.layers):
            x = _layer_tokens(vggt_tokens, layer, self.vggt_channels)[:, :, ps:]
            if x.shape[2] == 0:
                raise ShapeError(f"vggt_tokens[{layer}]: no patch tokens after patch_start_idx={ps} (P = {x.shape[2] + ps})")
            if k == 0:
                dino = _dino_patches(dino_tokens, self.dino_channels, self.dino_prefix_tokens, x)
            elif x.shape[:3] != out[0].shape[:3]:
                raise ShapeError(f"vggt_tokens[{layer}]: expected [B, S, Np] = {list(out[0].shape[:3])} as layer "
                                 f"{self.layers[0]}, got {list(x.shape[:3])}")
            out.append(x if dino is None else torch.cat([x, dino.to(x.dtype)], dim=-1))
        return out


class GlobalGeometryCondition(_TokenListCondition):
    """Global Geometry Condition: all views' VGGT features -> one ``(B, T, C)`` token list (module docstring).

    Args (official values in brackets):
        channels: token width ``C``, the SS flow's ``cond_channels`` [1024].
        vggt_channels: width of one aggregator output ``Cv`` [2048].
        dino_channels: width ``Cd`` of DINOv2 tokens concatenated to each layer's patch tokens;
            0 (default, the paper: VGGT features only) or [1024] (the official code: 3072-wide context).
        num_tokens: length ``T`` of the learned token list [4096].
        num_heads: attention heads [16]; mlp_ratio [4].
        layers: the aggregator layers read, one fusion block each [4, 11, 17, 23].
        patch_start_idx: special tokens in front of each view's VGGT patch tokens [5].
        dino_prefix_tokens: leading DINO tokens dropped (cls + registers) [5].
        qk_rms_norm, qk_rms_norm_cross: [True, False]. init_std: token-list init std [1e-6].
        use_checkpoint, use_fp16: memory / precision switches (upstream's).

    The paper writes each of the 4 steps as one cross-attention ``T_k = CA(Q(T_{k-1}), K(F_k), V(F_k))``;
    the block here is upstream's (self-attention, cross-attention, MLP, each residual), of which
    that cross-attention is the middle part. With :class:`~recon3d.models.vggt.network.VGGTNetwork`:
    ``ggc(out["tokens"], patch_start_idx=out["patch_start_idx"])``.
    """

    def __init__(self, channels: int = 1024, vggt_channels: int = 2048, dino_channels: int = 0, num_tokens: int = 4096,
                 num_heads: int = 16, mlp_ratio: float = 4.0, layers: Sequence[int] = VGGT_CONDITION_LAYERS,
                 patch_start_idx: int = 5, dino_prefix_tokens: int = 5, qk_rms_norm: bool = True,
                 qk_rms_norm_cross: bool = False, init_std: float = 1e-6, use_checkpoint: bool = False,
                 use_fp16: bool = False):
        super().__init__(channels, vggt_channels, dino_channels, num_tokens, num_heads, mlp_ratio, layers, patch_start_idx,
                         dino_prefix_tokens, qk_rms_norm, qk_rms_norm_cross, init_std, use_checkpoint, use_fp16)

    def forward(self, vggt_tokens: Sequence[torch.Tensor], dino_tokens: torch.Tensor | None = None,
                patch_start_idx: int | None = None) -> torch.Tensor:
        """``vggt_tokens``: list of ``[B, S, P, Cv]`` (index ``L_k`` read); ``dino_tokens [B, S, Pd, Cd]``
        when built with ``dino_channels``; ``patch_start_idx`` overrides the built one (the VGGT
        network reports it) -> ``(B, T, C)`` in the blocks' dtype."""
        ctxs = self._contexts(vggt_tokens, dino_tokens, patch_start_idx)
        B = ctxs[0].shape[0]
        h = self.multiview_cond_tokens.expand(B, -1, -1).to(self.dtype)
        for block, ctx in zip(self.cond_blocks, ctxs):
            # all views' patch tokens side by side along the token axis: view-major (S Np) order
            h = block(h, ctx.reshape(B, -1, ctx.shape[-1]).to(self.dtype))
        return h

    def null(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Unconditional branch without running the net: zeros ``(B, T, C)``."""
        return torch.zeros(batch_size, self.num_tokens, self.channels, dtype=self.dtype,
                           device=device if device is not None else self.multiview_cond_tokens.device)


class PerViewCondition(_TokenListCondition):
    """Local Per-View Condition, the paper's version: one ``(T, C)`` token list per view (module docstring).

    Same blocks and arguments as :class:`GlobalGeometryCondition`, run on every view separately
    (views folded into the batch): view ``i``'s list attends to view ``i``'s layer-``L_k`` patch
    tokens only. The paper gives no list length; the default ``num_tokens`` 1374 equals the
    per-image token count of TRELLIS's DINO condition (and of the official PVC), so a SLAT-flow
    block sees as many tokens per view as before. The learned initial list ``view_cond_tokens`` is
    shared by all views (the paper initialises "a random token list" per view; a per-view parameter
    cannot serve a varying number of views).
    """

    tokens_name = "view_cond_tokens"

    def __init__(self, channels: int = 1024, vggt_channels: int = 2048, dino_channels: int = 0, num_tokens: int = 1374,
                 num_heads: int = 16, mlp_ratio: float = 4.0, layers: Sequence[int] = VGGT_CONDITION_LAYERS,
                 patch_start_idx: int = 5, dino_prefix_tokens: int = 5, qk_rms_norm: bool = True,
                 qk_rms_norm_cross: bool = False, init_std: float = 1e-6, use_checkpoint: bool = False,
                 use_fp16: bool = False):
        super().__init__(channels, vggt_channels, dino_channels, num_tokens, num_heads, mlp_ratio, layers, patch_start_idx,
                         dino_prefix_tokens, qk_rms_norm, qk_rms_norm_cross, init_std, use_checkpoint, use_fp16)

    def forward(self, vggt_tokens: Sequence[torch.Tensor], dino_tokens: torch.Tensor | None = None,
                patch_start_idx: int | None = None) -> torch.Tensor:
        """As :meth:`GlobalGeometryCondition.forward` -> ``(B, S, T, C)`` (one list per view)."""
        ctxs = self._contexts(vggt_tokens, dino_tokens, patch_start_idx)
        B, S = ctxs[0].shape[:2]
        h = self.view_cond_tokens.expand(B * S, -1, -1).to(self.dtype)
        for block, ctx in zip(self.cond_blocks, ctxs):
            h = block(h, ctx.reshape(B * S, -1, ctx.shape[-1]).to(self.dtype))
        return h.reshape(B, S, self.num_tokens, self.channels)

    def null(self, batch_size: int, num_views: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Unconditional branch: zeros ``(B, S, T, C)``."""
        return torch.zeros(batch_size, num_views, self.num_tokens, self.channels, dtype=self.dtype,
                           device=device if device is not None else self.view_cond_tokens.device)


class LinearPerViewCondition(nn.Module):
    """Local Per-View Condition as the official code builds it: DINO tokens refined by VGGT layers.

    ``c_0 = DINO_i``; for each layer ``L_k``: ``c_k = ReLU(W_k [VGGT_Lk,i ‖ c_{k-1}] + b_k) + DINO_i``
    over all ``P`` tokens of view ``i`` (special tokens included, aligned position by position with
    DINO's cls/register tokens). Differs from the paper's :class:`PerViewCondition`: no learned
    token list, no attention, the DINO tokens are required and are both the start and a residual
    of every step; only the last layer's result is used. Upstream ``ModulatedSLATMultiViewCond``
    (official ``channels = 1024``, ``ctx_channels = 3072 = 2048 + 1024``).

    Args: channels ``C`` (= DINO width, [1024]); vggt_channels ``Cv`` [2048]; layers [4, 11, 17, 23];
    use_fp16. Keys ``linear_blocks.{k}.0.{weight (C, Cv + C), bias (C)}``.
    """

    def __init__(self, channels: int = 1024, vggt_channels: int = 2048, layers: Sequence[int] = VGGT_CONDITION_LAYERS,
                 use_fp16: bool = False):
        super().__init__()
        self.layers = _check_layers(layers)
        self.channels, self.vggt_channels = channels, vggt_channels
        self.linear_blocks = nn.ModuleList([nn.Sequential(nn.Linear(vggt_channels + channels, channels), nn.ReLU())
                                            for _ in self.layers])
        if use_fp16:
            self.linear_blocks.apply(convert_module_to_f16)

    @property
    def dtype(self) -> torch.dtype:
        return self.linear_blocks[0][0].weight.dtype

    def forward(self, vggt_tokens: Sequence[torch.Tensor], dino_tokens: torch.Tensor) -> torch.Tensor:
        """``vggt_tokens``: list of ``[B, S, P, Cv]``; ``dino_tokens [B, S, P, C]`` (all tokens, cls
        and registers included) -> ``(B, S, P, C)``."""
        first = _layer_tokens(vggt_tokens, self.layers[0], self.vggt_channels)
        if not isinstance(dino_tokens, torch.Tensor) or dino_tokens.ndim != 4 or dino_tokens.shape[-1] != self.channels \
                or dino_tokens.shape[:3] != first.shape[:3]:
            got = list(dino_tokens.shape) if isinstance(dino_tokens, torch.Tensor) else type(dino_tokens).__name__
            raise ShapeError(f"dino_tokens: expected [B, S, P, {self.channels}] with [B, S, P] = {list(first.shape[:3])} "
                             f"(the VGGT tokens' own, special tokens included), got {got}")
        dino = dino_tokens.to(self.dtype)
        c = dino
        for layer, block in zip(self.layers, self.linear_blocks):
            x = _layer_tokens(vggt_tokens, layer, self.vggt_channels)
            if x.shape[:3] != first.shape[:3]:
                raise ShapeError(f"vggt_tokens[{layer}]: expected [B, S, P] = {list(first.shape[:3])}, got {list(x.shape[:3])}")
            c = block(torch.cat([x.to(self.dtype), c], dim=-1)) + dino
        return c

    def null(self, batch_size: int, num_views: int, num_tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Unconditional branch: zeros ``(B, S, P, C)`` (official ``neg_cond``: a list of zeros)."""
        return torch.zeros(batch_size, num_views, num_tokens, self.channels, dtype=self.dtype,
                           device=device if device is not None else self.linear_blocks[0][0].weight.device)
