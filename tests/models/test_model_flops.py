"""FLOP accounting (recon3d.models.flops) against closed forms and independent counts.

Plain ``FlopCounterMode`` counts 0 for CPU ``scaled_dot_product_attention`` and could not see the
fused scan kernel; these tests pin the counts that replace those zeros:
- attention: the closed form ``4 B H Lq Lk D`` (forward) and, forward + backward, exactly what
  plain FlopCounterMode counts for the same attention written as explicit matmul / softmax;
- the scan kernel: the number of multiplies, adds and exps executed by a pure-Python run of the
  recurrence and of its gradient (an op-counting scalar), whose gradients are checked against the
  kernel's, so the count belongs to a correct backward.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from recon3d.models.flops import flop_counter, sdpa_flops, selective_scan_backward_flops, selective_scan_flops
from recon3d.models.ssm.cpu_kernel import cpu_kernel_available, fused_scan_core

aten = torch.ops.aten
CPU_FLASH = aten._scaled_dot_product_flash_attention_for_cpu


def _qkv(b=2, h=4, lq=9, lk=7, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype).requires_grad_() for n in (lq, lk, lk)]


def _counts(counter_cls, fn, *tensors):
    """(forward FLOPs, backward FLOPs, ops seen) of ``fn(*tensors).sum().backward()``."""
    with counter_cls(display=False) as fc:
        out = fn(*tensors)
        fwd = fc.get_total_flops()
        out.sum().backward()
    return fwd, fc.get_total_flops() - fwd, set(fc.get_flop_counts().get("Global", {}))


def _explicit_attention(q, k, v, scale=None, is_causal=False, attn_mask=None):
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("kwargs", [{}, {"is_causal": True}, {"scale": 0.3}, {"attn_mask": "float"}, {"attn_mask": "bool"}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_sdpa_counts_closed_form_and_explicit_math(kwargs, dtype):
    b, h, lq, lk, d = 2, 4, 9, 9 if kwargs.get("is_causal") else 7, 8
    kwargs = dict(kwargs)
    if kwargs.get("attn_mask") == "float":
        kwargs["attn_mask"] = torch.randn(lq, lk, dtype=dtype)
    elif kwargs.get("attn_mask") == "bool":
        kwargs["attn_mask"] = torch.rand(lq, lk, generator=torch.Generator().manual_seed(1)) > 0.3
        kwargs["attn_mask"][:, 0] = True  # no fully masked row
    fwd, bwd, ops = _counts(flop_counter, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kwargs), *_qkv(b, h, lq, lk, d, dtype))
    assert CPU_FLASH in ops, f"expected the CPU flash kernel to run, saw {ops}"  # the path plain FlopCounterMode misses
    assert fwd == 4 * b * h * lq * lk * d == sdpa_flops(b, h, lq, lk, d)
    assert bwd == 2 * fwd
    e_fwd, e_bwd, e_ops = _counts(FlopCounterMode, lambda q, k, v: _explicit_attention(q, k, v, **kwargs), *_qkv(b, h, lq, lk, d, dtype))
    assert e_ops == {aten.bmm}
    assert (fwd, bwd) == (e_fwd, e_bwd)


def test_plain_flop_counter_misses_cpu_sdpa_and_ours_adds_only_attention():
    """The defect (0 FLOPs for CPU attention) and that the mapping changes nothing else."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 24)
    x = torch.randn(2, 5, 8, requires_grad=True)

    def block(x):
        q, k, v = lin(x).view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v)

    plain = sum(_counts(FlopCounterMode, block, x)[:2])
    ours = sum(_counts(flop_counter, block, x)[:2])
    linear = 3 * 2 * (2 * 5) * 8 * 24  # forward matmul + the two gradient matmuls
    assert plain in (linear, linear + 3 * sdpa_flops(2, 2, 5, 5, 4))  # 0 for attention up to torch 2.13
    assert ours == linear + 3 * sdpa_flops(2, 2, 5, 5, 4)


def test_cuda_sdpa_backward_follows_the_same_convention_on_meta_tensors():
    """The CUDA kernels' backward is counted as 2x forward too (torch's own formula: 2.5x)."""
    q, k, v = (torch.empty(2, 4, n, 8, device="meta") for n in (9, 7, 7))
    fwd = sdpa_flops(2, 4, 9, 7, 8)
    with flop_counter() as fc:
        o = aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
        aten._scaled_dot_product_efficient_attention_backward(o[0], q, k, v, None, o[0], o[1], o[2], o[3], 0.0, [True, True, True, False])
        o = aten._scaled_dot_product_flash_attention(q, k, v)
        aten._scaled_dot_product_flash_attention_backward(o[0], q, k, v, o[0], o[1], o[2], o[3], o[4], o[5], 0.0, False, o[6], o[7])
    counts = fc.get_flop_counts()["Global"]
    assert counts[aten._scaled_dot_product_efficient_attention] == counts[aten._scaled_dot_product_flash_attention] == fwd
    assert counts[aten._scaled_dot_product_efficient_attention_backward] == counts[aten._scaled_dot_product_flash_attention_backward] == 2 * fwd


# --- selective scan kernel ----------------------------------------------------------------------


class _Counted:
    """A float that counts the multiplies, adds and exps done with it (class-wide counter)."""

    ops = 0

    def __init__(self, v: float):
        self.v = v

    @staticmethod
    def _val(x):
        return x.v if isinstance(x, _Counted) else x

    def __add__(self, o):
        _Counted.ops += 1
        return _Counted(self.v + self._val(o))

    __radd__ = __add__

    def __mul__(self, o):
        _Counted.ops += 1
        return _Counted(self.v * self._val(o))

    __rmul__ = __mul__


def _exp(x):
    _Counted.ops += 1
    return _Counted(math.exp(x.v))


def _python_scan(u, dt, A, B, C):
    """Forward recurrence on python scalars; inputs nested lists ``u, dt [b][d][s]``, ``A [d][n]``,
    ``B, C [b][g][n][s]``. Returns ``y``, and the stored decays, states and ``dt*u`` for backward."""
    nb, nd, L, n, ng = len(u), len(u[0]), len(u[0][0]), len(A[0]), len(B[0])
    y, dA, hs, x = {}, {}, {}, {}
    for b in range(nb):
        for d in range(nd):
            g = d // (nd // ng)
            h = [0.0] * n
            for s in range(L):
                x[b, d, s] = dt[b][d][s] * u[b][d][s]
                acc = 0.0
                for k in range(n):
                    dA[b, d, s, k] = _exp(dt[b][d][s] * A[d][k])
                    h[k] = dA[b, d, s, k] * h[k] + x[b, d, s] * B[b][g][k][s]
                    hs[b, d, s, k] = h[k]
                    acc = acc + C[b][g][k][s] * h[k]
                y[b, d, s] = acc
    return y, (dA, hs, x)


def _python_scan_backward(u, dt, A, B, C, gy, saved):
    """Gradients of ``sum(gy * y)`` from the stored forward values, written from the chain rule."""
    dA, hs, x = saved
    nb, nd, L, n, ng = len(u), len(u[0]), len(u[0][0]), len(A[0]), len(B[0])
    gu, gdt, gA, gB, gC = {}, {}, {}, {}, {}
    for b in range(nb):
        for d in range(nd):
            g_ = d // (nd // ng)
            carry = [0.0] * n
            for s in reversed(range(L)):
                gu_acc, gdt_acc = 0.0, 0.0
                for k in range(n):
                    grad_h = carry[k] + C[b][g_][k][s] * gy[b][d][s]  # dLoss/dh_s
                    gC[b, g_, k, s] = gC.get((b, g_, k, s), 0.0) + gy[b][d][s] * hs[b, d, s, k]
                    gB[b, g_, k, s] = gB.get((b, g_, k, s), 0.0) + grad_h * x[b, d, s]
                    gu_acc = gu_acc + grad_h * B[b][g_][k][s]
                    if s > 0:
                        ah = dA[b, d, s, k] * hs[b, d, s - 1, k]  # d h_s / d(dt_s A) = exp(dt_s A) h_{s-1}
                        gdt_acc = gdt_acc + grad_h * (B[b][g_][k][s] * u[b][d][s] + A[d][k] * ah)
                        gA[d, k] = gA.get((d, k), 0.0) + grad_h * dt[b][d][s] * ah
                        carry[k] = grad_h * dA[b, d, s, k]
                    else:
                        gdt_acc = gdt_acc + grad_h * B[b][g_][k][s] * u[b][d][s]
                gu[b, d, s] = gu_acc * dt[b][d][s]
                gdt[b, d, s] = gdt_acc
    return gu, gdt, gA, gB, gC


@pytest.mark.skipif(not cpu_kernel_available(), reason="the fused CPU scan kernel does not build here (no C compiler)")
@pytest.mark.parametrize("groups", [1, 2])
def test_scan_kernel_count_equals_ops_of_a_python_recurrence(groups):
    nb, nd, L, n = 2, 4, 6, 3
    g = torch.Generator().manual_seed(0)
    u, dt = torch.randn(nb, nd, L, generator=g, dtype=torch.float64), F.softplus(torch.randn(nb, nd, L, generator=g, dtype=torch.float64))
    A = -torch.exp(torch.randn(nd, n, generator=g, dtype=torch.float64))
    B, C = (torch.randn(nb, groups, n, L, generator=g, dtype=torch.float64) for _ in range(2))
    gy = torch.randn(nb, nd, L, generator=g, dtype=torch.float64)

    leaves = [t.clone().requires_grad_() for t in (u, dt, A, B, C)]
    with flop_counter() as fc:
        y, _ = fused_scan_core(*leaves)
        fwd = fc.get_total_flops()
        (y * gy).sum().backward()
    bwd = fc.get_total_flops() - fwd

    wrap = lambda t: [[[_Counted(v) for v in row] for row in mat] for mat in t.tolist()]  # noqa: E731
    cu, cdt = wrap(u), wrap(dt)
    cA = [[_Counted(v) for v in row] for row in A.tolist()]
    cB = [[[[_Counted(v) for v in r] for r in m] for m in bb] for bb in B.tolist()]
    cC = [[[[_Counted(v) for v in r] for r in m] for m in bb] for bb in C.tolist()]
    _Counted.ops = 0
    y_py, saved = _python_scan(cu, cdt, cA, cB, cC)
    ops_fwd = _Counted.ops
    _Counted.ops = 0
    grads_py = _python_scan_backward(cu, cdt, cA, cB, cC, gy.tolist(), saved)
    ops_bwd = _Counted.ops

    # the counted python code computes what the kernel computes
    y_ref = torch.tensor([[[y_py[b, d, s].v for s in range(L)] for d in range(nd)] for b in range(nb)], dtype=torch.float64)
    torch.testing.assert_close(y.detach(), y_ref, rtol=1e-12, atol=1e-12)
    shapes = {0: (nb, nd, L), 1: (nb, nd, L), 2: (nd, n), 3: (nb, groups, n, L), 4: (nb, groups, n, L)}
    for i, (leaf, gp) in enumerate(zip(leaves, grads_py)):
        ref = torch.zeros(shapes[i], dtype=torch.float64)
        for idx, val in gp.items():
            ref[idx] = val.v if isinstance(val, _Counted) else val
        torch.testing.assert_close(leaf.grad, ref, rtol=1e-10, atol=1e-10)

    assert fwd == ops_fwd == selective_scan_flops(nb, nd, L, n)
    assert bwd == ops_bwd == selective_scan_backward_flops(nb, nd, L, n)
