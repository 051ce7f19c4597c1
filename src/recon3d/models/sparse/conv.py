"""Submanifold sparse convolution and the sparse linear layer.

A submanifold convolution computes outputs only at the input's active voxels and reads only
active neighbours (missing ones count as zero), so the voxel set never grows:

    out[i] = bias + sum_taps  W[:, tap, :] @ feats[nbr(i, offset)],   tap = offset + k // 2,

a cross-correlation (no kernel flip) whose kernel axes are the coordinate columns 1..3
(``x, y, z``). The weight is stored exactly as spconv 2.x stores it, ``(Co, k, k, k, Ci)`` under
``<module>.conv.weight`` (+ ``<module>.conv.bias``), so TRELLIS checkpoints load unchanged; at
active sites it equals ``F.conv3d(dense, W.permute(0, 4, 1, 2, 3), padding=k // 2)``.

Backends (the registry of :mod:`recon3d.render.backends`, capability "sparse conv"):

- ``"torch"``: per-tap gather-GEMM-scatter over the cached neighbour map
  (:func:`~recon3d.models.sparse.hashing.neighbour_map`): the centre tap is one ``addmm`` over all
  voxels; every other tap gathers its pairs' input rows, multiplies by its ``(Ci, Co)`` slice and
  adds into the output rows (no two pairs of one tap share an output row). Any device, autograd.
- ``"spconv"``: spconv 2.x's ``SubMConv3d`` called with this module's weight (CPU wheel or CUDA
  build). The indices handed to it are always a contiguous int32 copy: spconv returns silently
  wrong values for non-contiguous ones (measured max error 1.04 on spconv 2.3.8).
- ``"auto"``: spconv on CUDA tensors when usable, else torch. On CPU ``auto`` is the torch path:
  it is the reference and as fast as spconv's CPU build (``benchmarks/bench_sparse.py``, 64^3,
  forward, cached maps, 2 threads at load ~6 on 2 cores: 0.5-1.1x spconv's time at 1-5 %
  occupancy and on a 3.9 % sphere shell, 1.2-1.6x at 20 %; 53x / 139x faster than dense
  ``conv3d`` at 5 % with C = 32 / 128), so spconv on CPU is only used when asked for by name.

spconv 2.3.8's CPU wheel, measured here: forward only (its backward calls ``torch.cuda``; the
wrapper refuses gradients on CPU with one line), and wrong rows with more than one torch thread
(the wrapper runs it on one).
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from recon3d.errors import BackendUnavailableError, ShapeError
from recon3d.models.sparse.hashing import neighbour_map, spatial_cache
from recon3d.render.backends import register_backend, resolve_backend
from recon3d.representations import SparseVoxels

__all__ = ["SparseSubMConv3d", "SparseLinear", "submanifold_conv3d", "has_spconv"]


def _spconv_probe() -> str | None:
    try:
        import spconv.pytorch  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means "not usable here"
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return None


register_backend("spconv", ("cpu", "cuda"), _spconv_probe)


def has_spconv() -> bool:
    """Whether spconv imports here (its CPU wheel or a CUDA build)."""
    from recon3d.render.backends import library_available

    return library_available("spconv")


def _check_weight(voxels: SparseVoxels, weight: torch.Tensor, bias: torch.Tensor | None) -> int:
    if not isinstance(voxels, SparseVoxels):
        raise ShapeError(f"voxels: expected a SparseVoxels, got {type(voxels).__name__}")
    if weight.ndim != 5 or not weight.shape[1] == weight.shape[2] == weight.shape[3] or weight.shape[1] % 2 == 0:
        raise ShapeError(f"weight: expected (Co, k, k, k, Ci) with odd k (spconv's layout), got {list(weight.shape)}")
    if weight.shape[4] != voxels.num_channels:
        raise ShapeError(f"voxels.feats: expected {weight.shape[4]} channels (the weight's Ci), got {voxels.num_channels}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ShapeError(f"bias: expected shape ({weight.shape[0]},), got {list(bias.shape)}")
    return weight.shape[1]


#: Pairs x channels of one group's temporaries (16 MB in float32): small enough to come from the
#: allocator's free lists, not fresh pages on every call (large CPU temporaries measured 5-10x
#: slower than the ops themselves).
_GROUP_ELEMENTS = 1 << 22
#: Scatter through a sparse-CSR addmm on the CPU (False: index_add_, for comparison).
_CSR_SCATTER = True


def _groups(nm, width: int):
    """Consecutive runs of taps ``(t0, t1, p0, p1)`` whose pairs x ``width`` fit a group."""
    rows = max(max(nm.splits), _GROUP_ELEMENTS // max(width, 1))
    out, t0, p0, acc = [], 0, 0, 0
    for t, n in enumerate(nm.splits):
        if acc and acc + n > rows:
            out.append((t0, t, p0, p0 + acc))
            t0, p0, acc = t, p0 + acc, 0
        acc += n
    out.append((t0, len(nm.splits), p0, p0 + acc))
    return out


def _scatter_matrix(nm, p0: int, p1: int, transpose: bool, dtype, device) -> torch.Tensor:
    """CSR ``(N, p1 - p0)`` 0/1 matrix adding pair ``p`` into its output row (input row when
    ``transpose``); cached on the map."""
    key = (p0, p1, transpose, dtype, device)
    cache = nm.__dict__.setdefault("_csr", {})
    if key not in cache:
        rows = (nm.in_idx if transpose else nm.out_idx)[p0:p1]
        order = torch.argsort(rows, stable=True)
        crow = torch.zeros(nm.num_voxels + 1, dtype=torch.int64, device=device)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=nm.num_voxels), 0)
        ones = torch.ones(p1 - p0, dtype=dtype, device=device)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": used for one addmm only
            warnings.simplefilter("ignore", UserWarning)
            cache[key] = torch.sparse_csr_tensor(crow, order, ones, size=(nm.num_voxels, p1 - p0))
    return cache[key]


def _taps_gemm(dst: torch.Tensor, src: torch.Tensor, w: torch.Tensor, nm, transpose: bool) -> torch.Tensor:
    """``dst[o] += src[i] @ w[t]`` over every tap's pairs (``o, i`` swapped and ``w[t]``
    transposed when ``transpose``: the input gradient); returns the new ``dst``.

    Taps are processed in groups (:data:`_GROUP_ELEMENTS`): one gather of the group's input rows,
    one GEMM per tap into a shared buffer, then the scatter. On the CPU (float32/64) the scatter
    is one sparse-CSR ``addmm`` (a 0/1 matrix per group, cached): measured 1-9x faster than the
    per-tap ``index_add_`` it replaces (scatter-add is not vectorised on the CPU); elsewhere
    ``index_add_``.
    """
    if not nm.taps:
        return dst
    outs, ins = (nm.in_idx, nm.out_idx) if transpose else (nm.out_idx, nm.in_idx)
    csr = _CSR_SCATTER and not src.is_cuda and src.dtype in (torch.float32, torch.float64)
    for t0, t1, p0, p1 in _groups(nm, max(src.shape[1], dst.shape[1])):
        g = src.index_select(0, ins[p0:p1])
        prod = src.new_empty(p1 - p0, dst.shape[1])
        off = 0
        for t, n in zip(nm.taps[t0:t1], nm.splits[t0:t1]):
            torch.mm(g[off : off + n], w[t].t() if transpose else w[t], out=prod[off : off + n])
            off += n
        if csr:
            dst.addmm_(_scatter_matrix(nm, p0, p1, transpose, src.dtype, src.device), prod)
        else:
            dst.index_add_(0, outs[p0:p1], prod)
    return dst


class _SubMConvFn(torch.autograd.Function):
    """Submanifold conv with a hand-written backward: it saves only ``feats`` and the weight
    (autograd through gathers would keep every tap's gathered rows)."""

    @staticmethod
    def forward(ctx, feats, weight, bias, nm):
        co, k, ci = weight.shape[0], weight.shape[1], weight.shape[4]
        w = weight.reshape(co, k**3, ci).permute(1, 2, 0).to(feats.dtype).contiguous()  # (k^3, Ci, Co)
        wc = w[nm.center]
        out = torch.addmm(bias.to(feats.dtype), feats, wc) if bias is not None else feats @ wc
        out = _taps_gemm(out, feats, w, nm, transpose=False)
        ctx.save_for_backward(feats, weight)
        ctx.nm, ctx.has_bias = nm, bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _SubMConvFn._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        feats, weight = ctx.saved_tensors
        nm = ctx.nm
        co, k, ci = weight.shape[0], weight.shape[1], weight.shape[4]
        grad_out = grad_out.contiguous().to(feats.dtype)
        w = weight.reshape(co, k**3, ci).permute(1, 2, 0).to(feats.dtype)
        g_feats = g_weight = g_bias = None
        if ctx.needs_input_grad[0]:
            g_feats = grad_out @ w[nm.center].t()
            g_feats = _taps_gemm(g_feats, grad_out, w, nm, transpose=True)
        if ctx.needs_input_grad[1]:
            gw = torch.zeros(k**3, ci, co, dtype=feats.dtype, device=feats.device)
            gw[nm.center] = feats.t() @ grad_out
            for t, o, i in nm.per_tap():
                gw[t] = feats.index_select(0, i).t() @ grad_out.index_select(0, o)
            g_weight = gw.permute(2, 0, 1).reshape(co, k, k, k, ci).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            g_bias = grad_out.sum(0)
        return g_feats, g_weight, g_bias, None


def _torch_conv(voxels: SparseVoxels, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    nm = neighbour_map(voxels, weight.shape[1])
    feats = voxels.feats.contiguous()
    dev = feats.device.type
    if torch.is_autocast_enabled(dev) and feats.dtype.is_floating_point:
        # As autocast does for conv3d: compute in its dtype (the Function itself runs with
        # autocast off, so its out= GEMMs and the scatter see one dtype).
        feats = feats.to(torch.get_autocast_dtype(dev))
    with torch.autocast(dev, enabled=False):
        return _SubMConvFn.apply(feats, weight, bias, nm)


# ---------------------------------------------------------------------------------------- spconv
def _spconv_module(k: int, ci: int, co: int, bias: bool):
    import spconv.pytorch as spconv

    # Native gather-GEMM on the CPU build (the only algorithm it has); the default elsewhere.
    return spconv.SubMConv3d(ci, co, k, bias=bias, indice_key=f"recon3d_subm{k}")


@contextlib.contextmanager
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _SpconvCall(torch.autograd.Function):
    """Runs spconv's conv, forward and backward, with one intra-op thread on the CPU: spconv
    2.3.8's CPU build returns wrong rows with more than one torch thread (measured here: 0.02-0.06 %
    of the rows off by up to 1.2 at 1.5-3 % occupancy of 64^3 with 2 threads, exact with one)."""

    @staticmethod
    def forward(ctx, feats, weight, bias, run):
        with _one_thread() if not feats.is_cuda else contextlib.nullcontext(), torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in (feats, weight, bias)]
            out = run(*leaves)
        ctx.leaves, ctx.out = leaves, out
        return out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        leaves = ctx.leaves
        want = [t for t in leaves if t is not None and t.requires_grad]
        if not want or not ctx.out.requires_grad:
            return None, None, None, None
        with _one_thread() if not grad_out.is_cuda else contextlib.nullcontext():
            grads = iter(torch.autograd.grad(ctx.out, want, grad_out))
        ctx.leaves = ctx.out = None
        return (*(next(grads) if t is not None and t.requires_grad else None for t in leaves), None)


def _spconv_conv(voxels: SparseVoxels, weight: torch.Tensor, bias: torch.Tensor | None, module_cache: dict) -> torch.Tensor:
    import spconv.pytorch as spconv
    from spconv.cppconstants import CPU_ONLY_BUILD

    if voxels.feats.is_cuda and CPU_ONLY_BUILD:
        raise BackendUnavailableError("sparse conv backend 'spconv' requested but unusable here: this spconv is a CPU-only build and the tensors are on CUDA")
    if not voxels.feats.is_cuda and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (voxels.feats, weight, bias)):
        # Its backward asks torch.cuda for a stream (measured on spconv 2.3.8's CPU wheel).
        raise BackendUnavailableError("sparse conv backend 'spconv' on CPU tensors is forward-only (spconv's CPU build has no backward); use backend 'torch' for gradients, or run under torch.no_grad()")
    k, ci, co = weight.shape[1], weight.shape[4], weight.shape[0]
    key = (k, ci, co, bias is not None)
    mod = module_cache.get(key)
    if mod is None:
        mod = module_cache[key] = _spconv_module(k, ci, co, bias is not None).to(voxels.feats.device)
    # spconv caches its indice pairs in the SparseConvTensor (indice_dict); keep one tensor per
    # coordinate set so consecutive convs on the same voxels reuse them, like the torch path.
    cache = spatial_cache(voxels.coords)
    st = cache.get("spconv_tensor")
    if st is None:
        # A contiguous int32 copy of (batch, x, y, z): spconv is silently wrong for
        # non-contiguous indices (measured max error 1.04).
        indices = voxels.coords.to(torch.int32).contiguous().clone()
        st = spconv.SparseConvTensor(voxels.feats.detach(), indices, [voxels.resolution] * 3, voxels.batch_size)
        cache["spconv_tensor"] = st
    assert st.indices.is_contiguous() and st.indices.dtype == torch.int32

    def run(feats, w, b):
        params = {"weight": w} | ({"bias": b} if b is not None else {})
        y = torch.func.functional_call(mod, params, (st.replace_feature(feats),))
        st.indice_dict.update(y.indice_dict)  # keep the pairs for the next conv on these voxels
        return y.features

    return _SpconvCall.apply(voxels.feats.contiguous(), weight, bias, run)


def submanifold_conv3d(voxels: SparseVoxels, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       backend: str = "auto", _spconv_modules: dict | None = None) -> torch.Tensor:
    """``(N, Co)`` submanifold convolution of ``voxels`` (module docstring for the maths).

    Args:
        voxels: ``N`` voxels with ``feats (N, Ci)``; objects may be empty (then they have no rows).
        weight: ``(Co, k, k, k, Ci)``, odd ``k`` (spconv's layout).
        bias: ``(Co,)`` or None.
        backend: ``"auto" | "torch" | "spconv"``.
    """
    _check_weight(voxels, weight, bias)
    device = voxels.feats.device
    if backend == "auto" and device.type == "cpu":
        backend = "torch"
    name = resolve_backend(backend, ("spconv",), device, what="sparse conv")
    if voxels.num_voxels == 0:
        return voxels.feats.new_zeros(0, weight.shape[0])
    if name == "spconv":
        return _spconv_conv(voxels, weight, bias, {} if _spconv_modules is None else _spconv_modules)
    return _torch_conv(voxels, weight, bias)


class _ConvParams(nn.Module):
    """Holds ``weight (Co, k, k, k, Ci)`` and ``bias (Co,)``: the ``.conv`` level of the keys."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, kernel_size, kernel_size, kernel_size, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        # nn.Conv3d's initialisation (fan_in = Ci * k^3).
        fan_in = in_channels * kernel_size**3
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)  # == kaiming_uniform_(a=sqrt(5))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)


class SparseSubMConv3d(nn.Module):
    """Submanifold 3-D convolution on :class:`SparseVoxels` (module docstring).

    Args:
        in_channels, out_channels: ``Ci``, ``Co``.
        kernel_size: odd ``k`` (3 in TRELLIS; 1 gives its ``SparseConv3d(·, ·, 1)`` layout).
        bias: learn ``conv.bias``.
        backend: ``"auto" | "torch" | "spconv"`` (module docstring).

    Input ``SparseVoxels`` with ``feats (N, Ci)``; output the same voxels with ``feats (N, Co)``.
    State-dict keys: ``conv.weight (Co, k, k, k, Ci)``, ``conv.bias (Co,)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True, backend: str = "auto"):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ShapeError(f"kernel_size: expected an odd integer >= 1 (submanifold), got {kernel_size!r}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.backend = backend
        self.conv = _ConvParams(in_channels, out_channels, kernel_size, bias)
        self._spconv_modules: dict = {}

    def forward(self, voxels: SparseVoxels) -> SparseVoxels:
        feats = submanifold_conv3d(voxels, self.conv.weight, self.conv.bias, self.backend, self._spconv_modules)
        return voxels.replace(feats=feats)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, backend={self.backend!r}"


class SparseLinear(nn.Linear):
    """A 1x1 layer on the features (TRELLIS's ``SparseLinear``: keys ``weight (Co, Ci)``, ``bias``).

    Input ``SparseVoxels`` ``feats (N, Ci)`` -> the same voxels with ``feats (N, Co)``.
    (A ``SparseSubMConv3d(..., kernel_size=1)`` is the same map in the ``(Co, 1, 1, 1, Ci)`` layout.)
    """

    def forward(self, voxels: SparseVoxels) -> SparseVoxels:  # type: ignore[override]
        if not isinstance(voxels, SparseVoxels):
            raise ShapeError(f"voxels: expected a SparseVoxels, got {type(voxels).__name__}")
        if voxels.num_channels != self.in_features:
            raise ShapeError(f"voxels.feats: expected {self.in_features} channels, got {voxels.num_channels}")
        return voxels.replace(feats=F.linear(voxels.feats, self.weight, self.bias))
