"""Attention over variable-length voxel sets: full (per object) and shifted-window (SLAT VAE).

Everything reduces to :func:`varlen_attention`: packed ``q (Nq, H, D)``, ``k, v (Nk, H, ·)`` and
per-segment lengths; segment ``s``'s queries attend to segment ``s``'s keys only (a
block-diagonal mask that is never materialised). Full attention uses the objects as segments;
windowed attention sorts the voxels by window and uses the windows.

Backends (registry of :mod:`recon3d.render.backends`, capability "sparse attention"):

- ``"torch"`` (any device): segments are grouped into buckets of similar length (next power of
  two of the query and key lengths); a bucket whose segments all have the same lengths is one
  ``scaled_dot_product_attention`` call without a mask (a lone long object: a view, no copy);
  otherwise its segments are padded to the bucket's longest and padded keys masked. Padding is
  thus at most 2x per bucket, and calls are chunked so the ``(S, H, Lq, Lk)`` scores of a masked
  call stay under ``score_budget`` elements. Padding every object to the longest one is the
  naive alternative; ``benchmarks/bench_sparse.py`` measures both (8 objects 8:4:4:2:2:1:1:1,
  4 x 32 heads, CPU: at 32k voxels packed +45 MB / 2.7 s, padded +194 MB / 10.0 s; a dense
  block-diagonal mask +1.3 GB already at 16k).
- ``"flash_attn"``: ``flash_attn_varlen_func`` with ``cu_seqlens`` (CUDA, float16/bfloat16 only).
- ``"xformers"``: ``memory_efficient_attention`` with a ``BlockDiagonalMask`` (CUDA).
- ``"auto"``: on CUDA, flash_attn (half precision) then xformers, else torch; on the CPU the
  torch path (no CPU library exists, so there is nothing to fall back from).

Empty objects: an object with no voxels has no queries and produces no rows (legal). Queries whose
segment has no keys (cross-attention to an empty context) have no defined output: one error.

Windowed attention (:func:`window_partition`) follows TRELLIS's ``windowed_attn``: voxel
``(b, x, y, z)`` belongs to window ``(b, (x + shift) // w, (y + shift) // w, (z + shift) // w)``;
the SLAT VAE's swin blocks use ``w = 8`` and ``shift = 4`` on odd blocks (:func:`swin_shift`).
Partitions are cached per coordinate set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from recon3d.errors import ShapeError
from recon3d.models.sparse.hashing import spatial_cache
from recon3d.render.backends import register_backend, resolve_backend
from recon3d.representations import SparseVoxels

__all__ = [
    "varlen_attention", "window_partition", "swin_shift", "sparse_self_attention", "sparse_windowed_attention",
    "sparse_cross_attention", "SparseMultiHeadAttention", "SparseMultiHeadRMSNorm",
]

_HALF = (torch.float16, torch.bfloat16)


def _import_probe(module: str):
    def probe() -> str | None:
        try:
            __import__(module)
        except Exception as err:  # noqa: BLE001 - any import failure means "not usable here"
            return f"{type(err).__name__}: {err}".splitlines()[0]
        return None

    return probe


register_backend("flash_attn", ("cuda",), _import_probe("flash_attn"))
register_backend("xformers", ("cuda",), _import_probe("xformers.ops"))


def _lengths(x, name: str) -> list[int]:
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    x = [int(v) for v in x]
    if any(v < 0 for v in x):
        raise ShapeError(f"{name}: expected lengths >= 0, got {x}")
    return x


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _segment_rows(starts: list[int], lens: list[int], width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, width)`` row index (clamped) and validity of the padded layout of segments."""
    st = torch.tensor(starts, dtype=torch.int64, device=device)[:, None]
    ln = torch.tensor(lens, dtype=torch.int64, device=device)[:, None]
    pos = torch.arange(width, device=device)[None]
    return st + torch.minimum(pos, (ln - 1).clamp_min(0)), pos < ln


def _torch_varlen(q, k, v, qlens, klens, scale, score_budget):
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    qst = [0] * len(qlens)
    kst = [0] * len(klens)
    for s in range(1, len(qlens)):
        qst[s] = qst[s - 1] + qlens[s - 1]
        kst[s] = kst[s - 1] + klens[s - 1]
    buckets: dict[tuple[int, int], list[int]] = {}
    for s, (lq, lk) in enumerate(zip(qlens, klens)):
        if lq:
            buckets.setdefault((_next_pow2(lq), _next_pow2(lk)), []).append(s)
    h = q.shape[1]
    for segs in buckets.values():
        same = len({(qlens[s], klens[s]) for s in segs}) == 1
        lq, lk = max(qlens[s] for s in segs), max(klens[s] for s in segs)
        chunk = len(segs) if same else max(1, score_budget // max(h * lq * lk, 1))
        for c0 in range(0, len(segs), chunk):
            part = segs[c0 : c0 + chunk]
            if len(part) == 1:
                s = part[0]
                a, b = qst[s], qst[s] + qlens[s]
                ks = k[kst[s] : kst[s] + klens[s]].transpose(0, 1)[None]
                vs = v[kst[s] : kst[s] + klens[s]].transpose(0, 1)[None]
                o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1)[None], ks, vs, scale=scale)
                out[a:b] = o[0].transpose(0, 1)
                continue
            pq = [qlens[s] for s in part]
            pk = [klens[s] for s in part]
            qi, qv = _segment_rows([qst[s] for s in part], pq, lq, q.device)
            ki, kv = _segment_rows([kst[s] for s in part], pk, lk, q.device)
            qs = q[qi].permute(0, 2, 1, 3)  # (S, H, Lq, D)
            ks = k[ki].permute(0, 2, 1, 3)
            vs = v[ki].permute(0, 2, 1, 3)
            mask = None if same else kv[:, None, None, :]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)  # (S, H, Lq, Dv)
            out[qi[qv]] = o.permute(0, 2, 1, 3)[qv]
    return out


def _nonempty(q, k, v, qlens, klens):
    """Drop segments without queries (the CUDA kernels are given only real work)."""
    if all(qlens):
        return k, v, qlens, klens
    keep = [s for s, n in enumerate(qlens) if n]
    kst = [0]
    for n in klens:
        kst.append(kst[-1] + n)
    rows = torch.cat([torch.arange(kst[s], kst[s + 1], device=k.device) for s in keep])
    return k[rows], v[rows], [qlens[s] for s in keep], [klens[s] for s in keep]


def _cu(lens, device):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _flash_varlen(q, k, v, qlens, klens, scale):
    import flash_attn

    k, v, qlens, klens = _nonempty(q, k, v, qlens, klens)
    return flash_attn.flash_attn_varlen_func(q.contiguous(), k.contiguous(), v.contiguous(), _cu(qlens, q.device), _cu(klens, q.device),
                                             max(qlens), max(klens), softmax_scale=scale)


def _xformers_varlen(q, k, v, qlens, klens, scale):
    import xformers.ops as xops

    k, v, qlens, klens = _nonempty(q, k, v, qlens, klens)
    mask = xops.fmha.BlockDiagonalMask.from_seqlens(qlens, klens)
    return xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=mask, scale=scale)[0]


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lens: Sequence[int] | torch.Tensor,
                     kv_lens: Sequence[int] | torch.Tensor | None = None, backend: str = "auto",
                     scale: float | None = None, score_budget: int = 1 << 25) -> torch.Tensor:
    """Block-diagonal attention over packed segments (module docstring).

    Args:
        q: ``(Nq, H, D)`` queries, segments contiguous and in order.
        k: ``(Nk, H, D)`` keys; v: ``(Nk, H, Dv)`` values.
        q_lens: ``S`` query lengths (sum ``Nq``); kv_lens: ``S`` key lengths (sum ``Nk``;
            default ``q_lens``, self-attention).
        backend: ``"auto" | "torch" | "flash_attn" | "xformers"``.
        scale: softmax scale (default ``D ** -0.5``).
        score_budget: torch path: the most ``S * H * Lq * Lk`` score elements of one masked call.

    Returns:
        ``(Nq, H, Dv)``.
    """
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3 or k.shape[:2] != v.shape[:2] or q.shape[1:] != k.shape[1:]:
        raise ShapeError(f"q, k, v: expected (Nq, H, D), (Nk, H, D), (Nk, H, Dv), got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    qlens = _lengths(q_lens, "q_lens")
    klens = qlens if kv_lens is None else _lengths(kv_lens, "kv_lens")
    if len(klens) != len(qlens):
        raise ShapeError(f"kv_lens: expected {len(qlens)} segments (as q_lens), got {len(klens)}")
    if sum(qlens) != q.shape[0] or sum(klens) != k.shape[0]:
        raise ShapeError(f"q_lens/kv_lens: expected sums {q.shape[0]} / {k.shape[0]} (the packed rows), got {sum(qlens)} / {sum(klens)}")
    empty = [s for s, (a, b) in enumerate(zip(qlens, klens)) if a and not b]
    if empty:
        raise ShapeError(f"kv_lens: segment {empty[0]} has {qlens[empty[0]]} queries but no keys (attention over an empty set is undefined)")
    if backend == "flash_attn" and q.dtype not in _HALF:
        raise ShapeError(f"q: backend 'flash_attn' needs float16 or bfloat16 tensors, got {q.dtype}")
    dev = q.device
    if backend == "auto" and dev.type != "cuda":
        backend = "torch"
    libs = ("flash_attn", "xformers") if q.dtype in _HALF or backend == "flash_attn" else ("xformers",)
    name = resolve_backend(backend, libs, dev, what="sparse attention")
    if q.shape[0] == 0:
        return q.new_empty(0, q.shape[1], v.shape[2])
    if name == "flash_attn":
        return _flash_varlen(q, k, v, qlens, klens, scale)
    if name == "xformers":
        return _xformers_varlen(q, k, v, qlens, klens, scale)
    return _torch_varlen(q, k, v, qlens, klens, scale, score_budget)


# ------------------------------------------------------------------------------ on SparseVoxels
def swin_shift(block_index: int, window_size: int = 8) -> int:
    """The SLAT VAE's shift of block ``block_index``: ``window_size // 2`` on odd blocks, else 0."""
    return window_size // 2 * (block_index % 2)


def window_partition(voxels: SparseVoxels, window_size: int, shift: int = 0):
    """``(order (N,), inverse (N,), lens)``: ``voxels`` sorted by window (module docstring),
    the inverse permutation, and the voxel count of each non-empty window (cached)."""
    if not isinstance(window_size, int) or window_size < 1:
        raise ShapeError(f"window_size: expected an integer >= 1, got {window_size!r}")
    if not isinstance(shift, int) or not 0 <= shift < window_size:
        raise ShapeError(f"shift: expected an integer in [0, {window_size}), got {shift!r}")
    cache = spatial_cache(voxels.coords)
    key = ("windows", window_size, shift)
    if key not in cache:
        c = voxels.coords.long()
        nw = -(-(voxels.resolution + shift) // window_size)
        w = torch.div(c[:, 1:] + shift, window_size, rounding_mode="floor")
        wkey = ((c[:, 0] * nw + w[:, 0]) * nw + w[:, 1]) * nw + w[:, 2]
        order = torch.argsort(wkey, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        lens = torch.unique_consecutive(wkey[order], return_counts=True)[1].tolist() if order.numel() else []
        cache[key] = (order, inverse, lens)
    return cache[key]


def _check_heads(x: torch.Tensor, voxels: SparseVoxels, name: str) -> None:
    if x.ndim != 3 or x.shape[0] != voxels.num_voxels:
        raise ShapeError(f"{name}: expected ({voxels.num_voxels}, H, D) per voxel, got {list(x.shape)}")


def sparse_self_attention(voxels: SparseVoxels, q, k, v, backend: str = "auto", scale: float | None = None) -> torch.Tensor:
    """Full self-attention within each object: ``q, k, v (N, H, ·)`` rows of ``voxels`` -> ``(N, H, Dv)``."""
    for t, nm in ((q, "q"), (k, "k"), (v, "v")):
        _check_heads(t, voxels, nm)
    lens = voxels.counts.tolist()
    return varlen_attention(q, k, v, lens, lens, backend, scale)


def sparse_windowed_attention(voxels: SparseVoxels, q, k, v, window_size: int = 8, shift: int = 0,
                              backend: str = "auto", scale: float | None = None) -> torch.Tensor:
    """Self-attention within each ``window_size^3`` window of each object -> ``(N, H, Dv)``."""
    for t, nm in ((q, "q"), (k, "k"), (v, "v")):
        _check_heads(t, voxels, nm)
    order, inverse, lens = window_partition(voxels, window_size, shift)
    o = varlen_attention(q[order], k[order], v[order], lens, lens, backend, scale)
    return o[inverse]


def sparse_cross_attention(voxels: SparseVoxels, q: torch.Tensor, k, v, kv_lens=None, backend: str = "auto",
                           scale: float | None = None) -> torch.Tensor:
    """Each object's voxels attend to its own context: ``k, v`` dense ``(B, L, H, ·)`` or packed
    ``(Nk, H, ·)`` with ``kv_lens`` (B,) -> ``(N, H, Dv)``."""
    _check_heads(q, voxels, "q")
    if k.ndim == 4:
        if k.shape[0] != voxels.batch_size or v.shape[:2] != k.shape[:2]:
            raise ShapeError(f"k, v: expected ({voxels.batch_size}, L, H, ·) per object, got {list(k.shape)}, {list(v.shape)}")
        kv_lens = [k.shape[1]] * k.shape[0]
        k, v = k.flatten(0, 1), v.flatten(0, 1)
    elif kv_lens is None:
        raise ShapeError("kv_lens: required with packed (Nk, H, D) keys")
    return varlen_attention(q, k, v, voxels.counts.tolist(), kv_lens, backend, scale)


class SparseMultiHeadRMSNorm(nn.Module):
    """Per-head RMS norm ``normalize(x) * gamma * sqrt(D)`` on ``(N, H, D)`` (key ``gamma (H, D)``)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x.float(), dim=-1) * self.gamma * self.scale).to(x.dtype)


class SparseMultiHeadAttention(nn.Module):
    """TRELLIS's sparse multi-head attention on :class:`SparseVoxels` (keys as upstream:
    ``to_qkv`` or ``to_q`` + ``to_kv``, ``to_out``, ``q_rms_norm.gamma``, ``k_rms_norm.gamma``).

    Args:
        channels: ``C`` of the voxel features; num_heads: ``H`` (``C % H == 0``).
        ctx_channels: context channels of cross-attention (default ``C``).
        type: ``"self"`` or ``"cross"`` (context: dense ``(B, L, Cc)`` or a ``SparseVoxels``).
        attn_mode: ``"full"`` (per object) or ``"windowed"`` (self only).
        window_size, shift_window: the windows (``shift_window`` an int in ``[0, window_size)``).
        qkv_bias, qk_rms_norm: as upstream. backend: :func:`varlen_attention`'s.

    ``forward(voxels, context=None)``: ``feats (N, C)`` -> the same voxels with ``feats (N, C)``.
    """

    def __init__(self, channels: int, num_heads: int, ctx_channels: int | None = None, type: str = "self",
                 attn_mode: str = "full", window_size: int | None = None, shift_window: int = 0,
                 qkv_bias: bool = True, qk_rms_norm: bool = False, backend: str = "auto"):
        super().__init__()
        if channels % num_heads:
            raise ShapeError(f"num_heads: expected a divisor of channels {channels}, got {num_heads}")
        if type not in ("self", "cross"):
            raise ShapeError(f"type: expected 'self' or 'cross', got {type!r}")
        if attn_mode not in ("full", "windowed"):
            raise ShapeError(f"attn_mode: expected 'full' or 'windowed', got {attn_mode!r}")
        if attn_mode == "windowed" and (type != "self" or window_size is None):
            raise ShapeError("attn_mode 'windowed': needs type 'self' and a window_size")
        self.channels, self.num_heads, self.type, self.attn_mode = channels, num_heads, type, attn_mode
        self.window_size, self.shift_window, self.qk_rms_norm, self.backend = window_size, shift_window, qk_rms_norm, backend
        if type == "self":
            self.to_qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        else:
            self.to_q = nn.Linear(channels, channels, bias=qkv_bias)
            self.to_kv = nn.Linear(ctx_channels or channels, 2 * channels, bias=qkv_bias)
        if qk_rms_norm:
            self.q_rms_norm = SparseMultiHeadRMSNorm(channels // num_heads, num_heads)
            self.k_rms_norm = SparseMultiHeadRMSNorm(channels // num_heads, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, voxels: SparseVoxels, context: torch.Tensor | SparseVoxels | None = None) -> SparseVoxels:
        if voxels.num_channels != self.channels:
            raise ShapeError(f"voxels.feats: expected {self.channels} channels, got {voxels.num_channels}")
        h = self.num_heads
        n = voxels.num_voxels
        if self.type == "self":
            q, k, v = self.to_qkv(voxels.feats).reshape(n, 3, h, -1).unbind(1)
        else:
            if context is None:
                raise ShapeError("context: cross-attention needs a context ((B, L, C) tensor or SparseVoxels)")
            q = self.to_q(voxels.feats).reshape(n, h, -1)
            ctx = context.feats if isinstance(context, SparseVoxels) else context
            k, v = self.to_kv(ctx).reshape(*ctx.shape[:-1], 2, h, -1).unbind(-3)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        if self.type == "cross":
            kv_lens = context.counts.tolist() if isinstance(context, SparseVoxels) else None
            o = sparse_cross_attention(voxels, q, k, v, kv_lens, self.backend)
        elif self.attn_mode == "windowed":
            o = sparse_windowed_attention(voxels, q, k, v, self.window_size, self.shift_window, self.backend)
        else:
            o = sparse_self_attention(voxels, q, k, v, self.backend)
        return voxels.replace(feats=self.to_out(o.reshape(n, -1)))
