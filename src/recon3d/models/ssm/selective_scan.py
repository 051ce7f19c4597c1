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
``K = max|A| * sum(delta over the chunk) / 2``; the chunk length is halved (down to 1, which is the
plain recurrence) until ``K`` is below :data:`EXP_LIMIT` for the dtype; a one-step chunk is anchored at its
end (``exp(delta*A) <= 1`` for negative ``A``), so the result never overflows, whatever ``delta``
and ``A`` are (steep decays only cost speed).

Gradients: an explicit backward, not autograd through the chunks
-----------------------------------------------------------------
Autograd through the rescaled chunks fails in float32 in two ways: the backward of ``x / E`` is
``-g * (x / E) / E``, a factor ``exp(2K)`` that overflows (or ``E**2`` underflows) once ``K``
passes ~44, giving non-finite ``delta``/``A`` gradients; and the ``A`` gradient comes out as the
difference of two terms of size ``K * |h|`` whose true difference can be many orders smaller
(strong decay), so its relative error grows without bound. :class:`_ChunkedScan` instead runs the
adjoint recurrence ``lam_t = dL/dh_t + exp(delta_{t+1} A) lam_{t+1}`` (the same chunked scan, on
the reversed sequence) and forms every gradient as a product of well-scaled factors::

    dA      = sum_t delta_t * lam_t * exp(delta_t A) * h_{t-1}
    ddelta_t = sum_n lam_t * (A exp(delta_t A) h_{t-1} + B_t u_t)
    du_t    = delta_t * sum_n lam_t B_t,   dB_t = sum_d lam_t delta_t u_t,   dC_t = sum_d dL/dy_t h_t

as mamba's own kernels do. Forward and adjoint scans only ever hold a quantity of the problem's own
scale times ``exp(+-K)``, which is what :data:`EXP_LIMIT` budgets for. The backward is
``once_differentiable`` (like the CUDA and C kernels): double backward through it raises.

Backends
--------
- ``"torch"``: the chunked scan above, forward and adjoint backward in plain tensor ops; any
  device. The reference the other backends are tested against.
- ``"fused_cpu"``: a C kernel (forward and backward, :mod:`recon3d.models.ssm.cpu_kernel`) that
  keeps each channel's state in registers and walks the sequence once, vectorised over ``N`` and
  threaded over channels; CPU tensors only; compiled on first use with the system C compiler.
  The chunked torch scan must write the ``(B, D, N, L)`` state to memory several times; the
  kernel never materialises it, which is what makes it an order of magnitude faster on a CPU.
- ``"mamba_ssm"``: the CUDA kernel, imported lazily, CUDA tensors only.
- ``"auto"``: ``mamba_ssm`` for CUDA inputs when it imports, ``fused_cpu`` for CPU inputs when it
  builds, else ``torch`` (with one warning). The choice is logged once per backend.

The two library backends are registered in recon3d's one backend registry
(:mod:`recon3d.render.backends`, shared with the renderers), which makes the choice; this module
only maps a chosen name to its implementation.
"""

from __future__ import annotations

import functools
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from recon3d.errors import ShapeError
from recon3d.render.backends import register_backend, resolve_backend

__all__ = [
    "selective_scan", "selective_scan_torch", "selective_scan_fused_cpu", "mamba_ssm_available", "EXP_LIMIT", "BACKENDS",
]

BackendName = Literal["auto", "torch", "fused_cpu", "mamba_ssm"]
#: Names accepted by :func:`selective_scan`'s ``backend`` argument.
BACKENDS: tuple[str, ...] = get_args(BackendName)

#: Largest exponent magnitude ``K`` allowed inside a chunk, per compute dtype. A rescaled value is a
#: value of the problem's own scale (a state, an input, a gradient) times ``exp(+-K)``, so ``K`` takes
#: half of the dtype's normal exponent range and leaves the other half to that scale: float32 spans
#: ``exp(+-87)``, so ``K = 43`` keeps states and gradients between ~1e-19 and ~1e19 exact to float32
#: rounding (the former 60 left ~1e-12..5e11); float64 (``exp(+-708)``) keeps ``exp(408)``. Every
#: dtype below float64 is computed in float32, so that entry covers them.
EXP_LIMIT = {torch.float32: 43.0, torch.float64: 300.0}


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
    limit = EXP_LIMIT.get(delta.dtype, EXP_LIMIT[torch.float32])
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


def _torch_core(u, dt, A, Bg, Cg, chunk_size: int):
    """The ``"torch"`` backend on prepared tensors (:func:`_prepare`): ``y (B, D, L)``, last state ``(B, D, N)``."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (u, dt, A, Bg, Cg)):
        return _ChunkedScan.apply(u, dt, A, Bg, Cg, chunk_size)
    y, h, _ = _scan_core(u, dt, A, Bg, Cg, chunk_size, keep_states=False)
    return y, h


def _grouped(t: torch.Tensor, g: int) -> torch.Tensor:
    """``(B, D, ...) -> (B, G, D // G, ...)``: channel ``d`` meets its group's ``B``/``C`` rows."""
    return t.reshape(t.shape[0], g, t.shape[1] // g, *t.shape[2:])


def _sum_over_states(X: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``sum_n X[..., n, t] * v[..., n, t]``: ``X (B, G, Dg, N, T)``, ``v (B, G, N, T)`` -> ``(B, G, Dg, T)``.

    A loop of ``N`` fused multiply-adds: einsum routes this through a batched matmul over ``t``
    that first copies ``X`` into a permuted layout, several times slower on the CPU.
    """
    out = X[..., 0, :] * v[:, :, None, 0]
    for k in range(1, X.shape[-2]):
        out.addcmul_(X[..., k, :], v[:, :, None, k])
    return out


def _sum_over_channels(X: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_d X[:, :, d, n, t] * w[:, :, d, t]``: ``X (B, G, Dg, N, T)``, ``w (B, G, Dg, T)`` -> ``(B, G, N, T)``.

    One state ``n`` at a time, so the temporary is ``(B, G, Dg, T)`` rather than the size of ``X``.
    """
    return torch.stack([(X[..., k, :] * w).sum(2) for k in range(X.shape[-2])], 2)


def _chunked_recurrence(x_scale, dt, A, Bg, Cg, h0, T: int, keep_states: bool):
    """``h_t = exp(dt_t A) h_{t-1} + x_scale_t * Bg_t`` by chunks of ``T`` steps (module docstring).

    Args:
        x_scale: ``(B, G, Dg, L)`` per-channel input factor (``delta * u``; ``dL/dy`` for the adjoint).
        dt: ``(B, G, Dg, L)`` non-negative step sizes.
        A: ``(G, Dg, N)``.
        Bg: ``(B, G, N, L)`` per-state input factor.
        Cg: ``(B, G, N, L)`` output projection, or None for no output.
        h0: ``(B, G, Dg, N)`` state before step 0, or None for zeros.
        T: chunk length, from :func:`_chunk_size` for this ``dt``.
        keep_states: also return every state ``h_t``.

    Returns:
        ``y (B, G, Dg, L)`` or None, the states ``(B, G, Dg, N, L)`` or None, the last state
        ``(B, G, Dg, N)``.
    """
    b, g, dg, L = x_scale.shape
    n = A.shape[-1]
    pad = (-L) % T
    if pad:  # delta = 0 and x = 0 leave the state untouched, so padding at the end is exact
        x_scale, dt, Bg = F.pad(x_scale, (0, pad)), F.pad(dt, (0, pad)), F.pad(Bg, (0, pad))
        Cg = None if Cg is None else F.pad(Cg, (0, pad))
    Lp = L + pad
    xs = x_scale[:, :, :, None]  # (B, G, Dg, 1, Lp)
    gam = dt.reshape(b, g, dg, Lp // T, T).cumsum(-1).view(b, g, dg, 1, Lp)
    An = A[..., None]  # (G, Dg, N, 1)
    Bx = Bg[:, :, None]  # (B, G, 1, N, Lp)
    h = x_scale.new_zeros(b, g, dg, n, 1) if h0 is None else h0[..., None]
    ys = []
    states = x_scale.new_empty(b, g, dg, n, Lp) if keep_states else None
    for s in range(0, Lp, T):
        gm = gam[..., s : s + T]  # (B, G, Dg, 1, T) cumulative delta inside the chunk
        # Centre the exponents on the chunk's middle; a one-step chunk anchors at its end instead,
        # where E = 1 and the carry factor exp(delta * A) <= 1, so no delta*A can overflow.
        mid = gm[..., -1:] if T == 1 else 0.5 * gm[..., -1:]
        E = torch.exp((gm - mid) * An)  # (B, G, Dg, N, T), every exponent within +-EXP_LIMIT
        x = xs[..., s : s + T] * Bx[..., s : s + T]
        acc = torch.cumsum(x / E, -1) + torch.exp(mid * An) * h
        # states h_t of the chunk, written straight into the kept states when there are any
        hc = E * acc if states is None else torch.mul(E, acc, out=states[..., s : s + T])
        if Cg is not None:
            ys.append(_sum_over_states(hc, Cg[..., s : s + T]))
        h = hc[..., -1:]
    y = None if Cg is None else torch.cat(ys, -1)[..., :L]
    return y, None if states is None else states[..., :L], h[..., 0]


def _scan_core(u, dt, A, Bg, Cg, chunk_size: int, keep_states: bool):
    """The forward scan on prepared tensors: ``u, dt (B, D, L)``, ``A (D, N)``, ``Bg, Cg (B, G, N, L)``.

    Returns ``y (B, D, L)``, the last state ``(B, D, N)`` and, with ``keep_states``, every state
    ``(B, G, D // G, N, L)`` (else None).
    """
    b, d, L = u.shape
    g = Bg.shape[1]
    T = _chunk_size(dt, A, chunk_size)
    y, states, last = _chunked_recurrence(
        _grouped(dt * u, g), _grouped(dt, g), A.reshape(g, d // g, -1), Bg, Cg, None, T, keep_states
    )
    return y.reshape(b, d, L), last.reshape(b, d, -1), states


class _ChunkedScan(torch.autograd.Function):
    """``y, h_last = scan(u, dt, A, Bg, Cg)`` with the chunked forward and the adjoint-scan backward.

    Shapes as :func:`_scan_core`; see the module docstring for the backward's formulas and why
    it is not left to autograd.
    """

    @staticmethod
    def forward(ctx, u, dt, A, Bg, Cg, chunk_size: int):
        y, last, states = _scan_core(u, dt, A, Bg, Cg, chunk_size, keep_states=True)
        ctx.save_for_backward(u, dt, A, Bg, Cg, states)
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        return y, last.clone()  # not a view of the saved states, which it could otherwise overwrite

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, glast):
        u, dt, A, Bg, Cg, states = ctx.saved_tensors
        need_u, need_dt, need_A, need_B, need_C = ctx.needs_input_grad[:5]
        b, d, L = u.shape
        g = Bg.shape[1]
        Ag = A.reshape(g, d // g, -1)  # (G, Dg, N)
        gyg = _grouped(gy, g) if gy is not None else u.new_zeros(b, g, d // g, L)
        gu = gdt = gA = gB = gC = None
        if need_C:
            gC = _sum_over_channels(states, gyg)
        if need_u or need_dt or need_A or need_B:
            # Adjoint lam_t = dL/dh_t + exp(dt_{t+1} A) lam_{t+1}: the forward recurrence on the
            # reversed sequence, input dL/dy * C, step t+1's decay at step t (the first one unused),
            # dL/dh_last as the state before the first reversed step.
            dt_rev = F.pad(_grouped(dt, g).flip(-1)[..., :-1], (1, 0))
            h0 = None if glast is None else _grouped(glast, g)
            T = _chunk_size(dt_rev.reshape(b, d, L), A, ctx.chunk_size)
            _, lam, _ = _chunked_recurrence(gyg.flip(-1), dt_rev, Ag, Cg.flip(-1), None, h0, T, keep_states=True)
            lam = lam.flip(-1)  # (B, G, Dg, N, L)
            dtg, ug = _grouped(dt, g), _grouped(u, g)
            if need_B:
                gB = _sum_over_channels(lam, dtg * ug)
            if need_u or need_dt:
                gdu = _sum_over_states(lam, Bg)  # dL/d(delta_t u_t)
                gu = (gdu * dtg).reshape(b, d, L) if need_u else None
            if need_dt or need_A:
                # P_t = lam_t * exp(dt_t A) * h_{t-1} (h_{-1} = 0): a product, so it keeps its
                # relative precision however small the decay makes it.
                P = torch.exp(dtg[:, :, :, None] * Ag[..., None])
                P.mul_(lam)
                P[..., 1:].mul_(states[..., :-1])
                P[..., 0] = 0
                if need_A:
                    # contractions over the last axis of the contiguous P: matmuls without copies
                    gA = torch.matmul(P, dtg[..., None]).sum(0).reshape(A.shape)
                if need_dt:
                    gdt = (gdu * ug + torch.matmul(Ag[:, :, None], P)[..., 0, :]).reshape(b, d, L)
        return gu, gdt, gA, gB, gC, None


def _fused_cpu_core(u, dt, A, Bg, Cg, chunk_size: int):
    """The ``"fused_cpu"`` backend on prepared tensors: only the recurrence runs in C (forward and
    backward, :mod:`recon3d.models.ssm.cpu_kernel`); bias, softplus, ``D`` and the gate stay in
    torch (cheap ``(B, D, L)`` element-wise ops). ``chunk_size`` is unused (no chunks)."""
    from recon3d.models.ssm.cpu_kernel import fused_scan_core

    return fused_scan_core(u, dt, A, Bg, Cg)


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


def _fused_cpu_probe() -> str | None:
    """Why the fused C kernel cannot be used here (it is built on first use), or None."""
    from recon3d.models.ssm.cpu_kernel import kernel_build_error

    err = kernel_build_error()
    return None if err is None else str(err)


def _mamba_ssm_probe() -> str | None:
    fn = _mamba_scan_fn()
    return f"import failed ({fn})" if isinstance(fn, Exception) else None


#: The scan's registered libraries (``auto`` takes the first one usable for the inputs' device).
_LIBRARIES = ("fused_cpu", "mamba_ssm")
register_backend("mamba_ssm", ("cuda",), _mamba_ssm_probe)
register_backend("fused_cpu", ("cpu",), _fused_cpu_probe)
#: Backends that run on the prepared tensors of :func:`_prepare` (``mamba_ssm`` takes them raw).
_PREPARED_CORES = {"torch": _torch_core, "fused_cpu": _fused_cpu_core}


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
    """Selective scan (module docstring for the maths and the backends).

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
        backend: ``"auto" | "torch" | "fused_cpu" | "mamba_ssm"``. An explicit library raises
            :class:`~recon3d.errors.BackendUnavailableError` when it cannot run here (the C kernel
            does not build, mamba_ssm does not import, or the inputs are on the other device);
            ``"auto"`` picks the fastest usable one for the inputs' device, else the torch scan.
        chunk_size: upper bound on the torch scan's chunk length (halved automatically for
            stability); the other backends have no chunks.

    Returns:
        ``y (B, D, L)`` in ``u``'s dtype, or ``(y, last_state)``.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(backend, _LIBRARIES, u.device, what="selective scan")
    if name == "mamba_ssm":
        return _mamba_scan_fn()(
            u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
            None if D is None else D.float().contiguous(), None if z is None else z.contiguous(),
            None if delta_bias is None else delta_bias.float().contiguous(), delta_softplus, return_last_state,
        )
    u_, dt, A_, Bg, Cg = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    y, h = _PREPARED_CORES[name](u_, dt, A_, Bg, Cg, chunk_size)
    return _finish(y, h, u, u_, D, z, return_last_state)


def selective_scan_torch(*args, **kwargs):
    """:func:`selective_scan` with ``backend="torch"``: the chunked torch scan, any device (the
    reference the other backends are tested against); same arguments otherwise."""
    return selective_scan(*args, backend="torch", **kwargs)


def selective_scan_fused_cpu(*args, **kwargs):
    """:func:`selective_scan` with ``backend="fused_cpu"``: the C kernel, CPU tensors only."""
    return selective_scan(*args, backend="fused_cpu", **kwargs)
