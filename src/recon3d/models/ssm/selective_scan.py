"""Selective state-space scan (Mamba's S6 recurrence) in pure PyTorch, with the mamba_ssm kernel as a backend.

The recurrence, per batch ``b``, channel ``d`` and state ``n`` (time ``t = 0..L-1``, ``h_{-1} = 0``)::

    delta_t = softplus(delta_t + delta_bias)          (both optional)
    h_t     = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t
    y_t     = sum_n C_t[n] * h_t[n] + D[d] * u_t
    y_t     = y_t * silu(z_t)                          (optional gate)

Argument layout is the one of ``mamba_ssm.ops.selective_scan_interface.selective_scan_ref``:
``u, delta (B, D, L)``, ``A (D, N)`` (real), ``B, C (B, N, L)`` or grouped ``(B, G, N, L)``
(channel ``d`` uses group ``d // (D // G)``), ``D (D,)``, ``z (B, D, L)``, ``delta_bias (D,)``.

How the torch backend is fast without a Python loop over ``L``
----------------------------------------------------------------
Because ``A`` does not depend on time, the decay from step ``s`` to step ``t`` is
``exp(A * (Gamma_t - Gamma_s))`` with ``Gamma = cumsum(delta)``: one cumulative sum of ``delta``
(log-space) replaces the product of decays. Inside a chunk of ``T`` steps, with ``m`` the middle of
the chunk's ``Gamma`` range::

    h_t = exp(A (Gamma_t - m)) * ( cumsum_s[ exp(-A (Gamma_s - m)) * x_s ] + exp(A (m - Gamma_0^-)) * h_start )

so a chunk costs one ``exp``, one ``cumsum`` and a few multiplies over ``(B, D, N, T)``, and a
sequential carry runs over the ``L / T`` chunks only. Centring on ``m`` bounds every exponent by
``max|A| * sum(delta over the chunk) / 2``; the chunk length is halved (down to 1, which is the
plain recurrence) until that bound is below :data:`EXP_LIMIT` for the dtype; a one-step chunk is anchored at its
end (``exp(delta*A) <= 1`` for negative ``A``), so the result never overflows, whatever ``delta``
and ``A`` are (steep decays only cost speed). All operations are differentiable by autograd.

Backends
--------
- ``"torch"``: the chunked scan above; any device, autograd through plain tensor ops. The
  reference the other backends are tested against.
- ``"fused_cpu"``: a C kernel (forward and backward, :mod:`recon3d.models.ssm.cpu_kernel`) that
  keeps each channel's state in registers and walks the sequence once, vectorised over ``N`` and
  threaded over channels; CPU tensors only; compiled on first use with the system C compiler.
  The chunked torch scan must write the ``(B, D, N, L)`` state to memory several times; the
  kernel never materialises it, which is what makes it an order of magnitude faster on a CPU.
- ``"mamba_ssm"``: the CUDA kernel, imported lazily, CUDA tensors only.
- ``"auto"``: ``mamba_ssm`` for CUDA inputs when it imports, ``fused_cpu`` for CPU inputs when it
  builds, else ``torch``. The choice is logged once per backend.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from recon3d.errors import BackendUnavailableError, ShapeError

__all__ = [
    "selective_scan", "selective_scan_torch", "selective_scan_fused_cpu", "mamba_ssm_available", "EXP_LIMIT", "BACKENDS",
]

BackendName = Literal["auto", "torch", "fused_cpu", "mamba_ssm"]
#: Names accepted by :func:`selective_scan`'s ``backend`` argument.
BACKENDS: tuple[str, ...] = get_args(BackendName)

log = logging.getLogger(__name__)

#: Largest exponent magnitude allowed inside a chunk, per dtype (exp(60) ~ 1e26 fits float32 with
#: room for the sums; float64 allows much longer chunks).
EXP_LIMIT = {torch.float16: 8.0, torch.bfloat16: 40.0, torch.float32: 60.0, torch.float64: 300.0}


@functools.lru_cache(maxsize=1)
def _mamba_scan_fn():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # type: ignore[import-not-found]
    except Exception as e:  # ImportError, or a broken CUDA build raising at import
        return e
    return selective_scan_fn


def mamba_ssm_available() -> bool:
    """True when ``mamba_ssm``'s CUDA selective-scan kernel imports and a CUDA device exists."""
    return torch.cuda.is_available() and not isinstance(_mamba_scan_fn(), Exception)


@functools.cache
def _log_backend(name: str) -> None:
    log.info("selective scan backend: %s", name)


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> tuple[int, int, int, int, int]:
    if not isinstance(u, torch.Tensor) or u.ndim != 3:
        raise ShapeError(f"u: expected shape (B, D, L), got {list(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__}")
    b, d, L = u.shape
    if tuple(delta.shape) != (b, d, L):
        raise ShapeError(f"delta: expected shape {[b, d, L]} like u, got {list(delta.shape)}")
    if A.ndim != 2 or A.shape[0] != d:
        raise ShapeError(f"A: expected shape ({d}, N), got {list(A.shape)}")
    if A.is_complex():
        raise ShapeError("A: complex A is not supported by the torch backend; expected a real (D, N) tensor")
    n = A.shape[1]
    groups = None
    for name, t in (("B", B), ("C", C)):
        if t.ndim == 3 and tuple(t.shape) == (b, n, L):
            g = 1
        elif t.ndim == 4 and t.shape[0] == b and t.shape[2:] == (n, L) and d % t.shape[1] == 0:
            g = t.shape[1]
        else:
            raise ShapeError(f"{name}: expected shape ({b}, {n}, {L}) or ({b}, G, {n}, {L}) with G dividing D={d}, got {list(t.shape)}")
        if groups is not None and g != groups:
            raise ShapeError(f"B and C: expected the same number of groups, got {groups} and {g}")
        groups = g
    if D is not None and tuple(D.shape) != (d,):
        raise ShapeError(f"D: expected shape ({d},), got {list(D.shape)}")
    if delta_bias is not None and tuple(delta_bias.shape) != (d,):
        raise ShapeError(f"delta_bias: expected shape ({d},), got {list(delta_bias.shape)}")
    if z is not None and tuple(z.shape) != (b, d, L):
        raise ShapeError(f"z: expected shape {[b, d, L]} like u, got {list(z.shape)}")
    return b, d, L, n, groups  # type: ignore[return-value]


def _chunk_size(delta: torch.Tensor, A: torch.Tensor, want: int) -> int:
    """Largest power-of-two chunk ``<= want`` whose exponents stay under :data:`EXP_LIMIT`."""
    limit = EXP_LIMIT.get(delta.dtype, 40.0)
    a_max = A.detach().abs().amax(-1)  # (D,)
    d = delta.detach()
    L = d.shape[-1]
    T = max(1, min(want, 1 << (max(L, 1) - 1).bit_length()))
    while T > 1:
        pad = (-L) % T
        sums = F.pad(d, (0, pad)).unflatten(-1, (-1, T)).sum(-1)  # (B, D, L/T)
        if float((sums.amax(-1) * a_max).max()) * 0.5 <= limit:
            break
        T //= 2
    return T


def selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    chunk_size: int = 64,
):
    """Chunked, parallel selective scan in pure PyTorch (see module docstring for the maths).

    Args:
        u: ``(B, D, L)`` input.
        delta: ``(B, D, L)`` step sizes (before ``delta_bias``/softplus).
        A: ``(D, N)`` real state matrix (negative for a stable scan).
        B: ``(B, N, L)`` or ``(B, G, N, L)`` input projections.
        C: same shape as ``B``, output projections.
        D: ``(D,)`` skip weights or None.
        z: ``(B, D, L)`` gate or None.
        delta_bias: ``(D,)`` or None.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the last state ``(B, D, N)``.
        chunk_size: upper bound on the chunk length (halved automatically for stability).

    Returns:
        ``y (B, D, L)`` in ``u``'s dtype, or ``(y, last_state)``.
    """
    b, d, L, n, g = _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    u_, dt, A_, Bg, Cg = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    dg = d // g

    T = _chunk_size(dt, A_, chunk_size)
    pad = (-L) % T
    if pad:  # delta = 0 and x = 0 leave the state untouched, so padding is exact
        u_p, dt_p = F.pad(u_, (0, pad)), F.pad(dt, (0, pad))
        Bg, Cg = F.pad(Bg, (0, pad)), F.pad(Cg, (0, pad))
    else:
        u_p, dt_p = u_, dt
    Lp = L + pad
    # (B, G, Dg, 1, Lp) views so that channel d meets its group's B/C rows.
    du = (dt_p * u_p).view(b, g, dg, 1, Lp)
    gam = dt_p.view(b, g, dg, Lp // T, T).cumsum(-1).view(b, g, dg, 1, Lp)
    An = A_.view(g, dg, n, 1)
    Bx = Bg[:, :, None]  # (B, G, 1, N, Lp)
    h = u_.new_zeros(b, g, dg, n, 1)
    ys = []
    for s in range(0, Lp, T):
        gm = gam[..., s : s + T]  # (B, G, Dg, 1, T) cumulative delta inside the chunk
        # Centre the exponents on the chunk's middle; a one-step chunk anchors at its end instead,
        # where E = 1 and the carry factor exp(delta * A) <= 1, so no delta*A can overflow.
        mid = gm[..., -1:] if T == 1 else 0.5 * gm[..., -1:]
        E = torch.exp((gm - mid) * An)  # (B, G, Dg, N, T), every exponent within +-EXP_LIMIT
        x = du[..., s : s + T] * Bx[..., s : s + T]
        acc = torch.cumsum(x / E, -1) + torch.exp(mid * An) * h
        hc = E * acc  # states h_t of the chunk
        ys.append(torch.einsum("bgdnt,bgnt->bgdt", hc, Cg[..., s : s + T]))
        h = hc[..., -1:]
    y = torch.cat(ys, -1).reshape(b, d, Lp)[..., :L]
    return _finish(y, h.reshape(b, d, n), u, u_, D, z, return_last_state)


def selective_scan_fused_cpu(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """The same scan as :func:`selective_scan_torch` through the fused C kernel (CPU tensors).

    Arguments, shapes and returns as :func:`selective_scan_torch`. Bias, softplus, ``D`` and the
    gate stay in torch (cheap ``(B, D, L)`` element-wise ops); only the recurrence runs in C.
    Raises :class:`BackendUnavailableError` when the kernel cannot be built or inputs are not on
    the CPU.
    """
    from recon3d.models.ssm.cpu_kernel import fused_scan_core

    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    u_, dt, A_, Bg, Cg = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    y, h = fused_scan_core(u_, dt, A_, Bg, Cg)
    return _finish(y, h, u, u_, D, z, return_last_state)


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus):
    """Cast to the compute dtype, apply bias/softplus, give B and C a group axis ``(B, G, N, L)``."""
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u_, dt = u.to(compute), delta.to(compute)
    if delta_bias is not None:
        dt = dt + delta_bias.to(compute)[None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    Bg = (B if B.ndim == 4 else B[:, None]).to(compute)
    Cg = (C if C.ndim == 4 else C[:, None]).to(compute)
    return u_, dt, A.to(compute), Bg, Cg


def _finish(y, h, u, u_, D, z, return_last_state):
    """Skip term, gate, cast back to the input dtype; ``h`` is the last state ``(B, D, N)``."""
    if D is not None:
        y = y + u_ * D.to(y.dtype)[None, :, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    y = y.to(u.dtype)
    if return_last_state:
        return y, h.to(u.dtype)
    return y


@functools.cache
def _fused_cpu_status() -> BackendUnavailableError | None:
    """The kernel's build error, warned about once (``auto`` then falls back to torch)."""
    from recon3d.models.ssm.cpu_kernel import kernel_build_error

    err = kernel_build_error()
    if err is not None:
        log.warning("selective scan: the fused CPU kernel is unavailable (%s); using the torch scan", err)
    return err


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: BackendName = "auto",
    chunk_size: int = 64,
):
    """Selective scan with backend choice; arguments and shapes as :func:`selective_scan_torch`.

    ``backend="mamba_ssm"`` raises :class:`BackendUnavailableError` when the kernel does not import
    or the inputs are not on CUDA; ``"fused_cpu"`` raises it when the C kernel cannot be built or
    the inputs are not on the CPU; ``"auto"`` picks the fastest usable one for the inputs' device
    and falls back to the torch scan otherwise (logged once). ``chunk_size`` only affects
    ``"torch"``.
    """
    if backend not in BACKENDS:
        raise BackendUnavailableError(f"selective scan backend: expected one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    on_cpu = isinstance(u, torch.Tensor) and u.device.type == "cpu"
    if backend == "fused_cpu" or (backend == "auto" and on_cpu):
        err = _fused_cpu_status()
        if backend == "fused_cpu" and err is not None:
            raise err
        if err is None:
            _log_backend("fused_cpu (C kernel)")
            return selective_scan_fused_cpu(*args)
        backend = "torch"
    use_kernel = False
    if backend != "torch":
        fn = _mamba_scan_fn()
        ok = not isinstance(fn, Exception) and u.is_cuda
        if backend == "mamba_ssm" and not ok:
            why = f"import failed ({fn})" if isinstance(fn, Exception) else "inputs are not on a CUDA device"
            raise BackendUnavailableError(f"selective scan backend 'mamba_ssm' requested but unusable: {why}; use backend='torch'")
        use_kernel = ok
    if use_kernel:
        _check_inputs(u, delta, A, B, C, D, z, delta_bias)
        _log_backend("mamba_ssm (CUDA kernel)")
        return fn(
            u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
            None if D is None else D.float().contiguous(), None if z is None else z.contiguous(),
            None if delta_bias is None else delta_bias.float().contiguous(), delta_softplus, return_last_state,
        )
    _log_backend("torch (chunked parallel scan)")
    return selective_scan_torch(*args, chunk_size=chunk_size)
