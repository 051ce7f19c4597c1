"""FLOP accounting for the models' operators that ``torch.utils.flop_counter`` does not count.

``FlopCounterMode`` counts an operator only when it has a formula in torch's registry. On the CPU
it has none for ``F.scaled_dot_product_attention`` (which dispatches to
``aten._scaled_dot_product_flash_attention_for_cpu`` and ``..._for_cpu_backward``: counted 0,
measured with torch 2.13), and it cannot see the fused C selective-scan kernel at all unless the
kernel is a dispatcher operator (it is: ``torch.ops.recon3d.selective_scan_fwd`` / ``_bwd``,
defined in :mod:`recon3d.models.ssm.cpu_kernel`). :func:`flop_counter` is a ``FlopCounterMode``
with the formulas below added (``custom_mapping``; torch's global registry is left untouched).
This module lives in ``models/`` because it names the models' own operators.

Convention: **model FLOPs** (what MFU divides by): one multiply or add = 1 FLOP (a multiply-add
= 2, as torch counts matmuls), work that an implementation repeats to save memory is not counted.

- Attention, ``q (B, H, Lq, Dqk)``, ``k (B, Hkv, Lk, Dqk)``, ``v (B, Hkv, Lk, Dv)`` (``Hkv``
  divides ``H``, grouped-query attention): forward = the two matmuls ``QK^T`` and ``PV``,
  ``2 B H Lq Lk (Dqk + Dv)`` (= ``4 B H Lq Lk D`` for equal head dims); softmax, scaling and masks
  are element-wise and not counted, as FlopCounterMode counts no element-wise op. Backward = the
  four gradient matmuls ``dV = P^T dO``, ``dP = dO V^T``, ``dQ = dS K``, ``dK = dS^T Q``: exactly
  **2x the forward**, which is what FlopCounterMode counts for the same attention written as
  explicit ``matmul -> softmax -> matmul`` (tested). A causal mask is not discounted (the explicit
  math computes the full score matrix too). Torch's own formula for the CUDA kernels' backward
  (``sdpa_backward_flop_count``) adds the flash kernel's recomputation of ``QK^T`` (2.5x the
  forward: hardware FLOPs); :data:`FLOP_FORMULAS` overrides those three CUDA entries with the
  model-FLOP count so that CPU and GPU figures follow one convention.
- Selective scan (the fused CPU kernel; Mamba's recurrence ``h_l = exp(dt_l A) h_{l-1} + dt_l u_l
  B_l``, ``y_l = <C_l, h_l>``), ``u (B, D, L)``, ``A (D, N)``: per channel and step the kernel
  computes ``dt*u`` once and, per state, ``dt*A``, ``exp`` (counted as 1 FLOP), ``* h``, ``+ x*B``
  (2), ``+= C*h`` (2): forward ``B D L (7N + 1)``. Backward, counted as if the forward's decays
  ``exp(dt A)``, states and ``dt*u`` were stored (the kernel recomputes them: ``5N + 2`` more per
  step, not counted): per state ``g = carry + C gy`` (2), ``a h_{l-1}`` (1), ``gC += gy h`` (2),
  ``gB += g dt u`` (2), ``gu += g B`` (2), ``gdt += g (B u + A a h_{l-1})`` (5), ``gA += g dt a
  h_{l-1}`` (3), ``carry = g a`` (1) = 18, and ``gu *= dt`` once per step; the first step has no
  ``h_{-1}`` terms (11 per state): backward ``B D (L (18N + 1) - 7N)``, ~2.6x the forward. For
  comparison, the Mamba authors quote ``9 B L D N`` for the forward of the *parallel* (associative)
  scan, which does ~2L combine steps (state-spaces/mamba#110); the kernel here is sequential.
  Bias, softplus, the ``D`` skip and the gate stay in torch as element-wise ops and are not
  counted, like every element-wise op. The pure-torch chunked scan is counted by FlopCounterMode
  through whatever matmuls (einsum) it uses, which is not this count: compare MFU figures for the
  same backend only.

Not covered: mamba_ssm's CUDA scan (a pybind call, invisible to dispatch modes) and the renderers'
custom kernels.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import recon3d.models.ssm.cpu_kernel  # noqa: F401  (defines torch.ops.recon3d.selective_scan_*)

__all__ = [
    "sdpa_flops", "sdpa_backward_flops", "selective_scan_flops", "selective_scan_backward_flops", "FLOP_FORMULAS",
    "flop_counter", "matmul_peak",
]

aten = torch.ops.aten


def sdpa_flops(batch: int, heads: int, len_q: int, len_k: int, dim_qk: int, dim_v: int | None = None) -> int:
    """Forward FLOPs of scaled dot-product attention: ``QK^T`` and ``PV``, ``2 B H Lq Lk (Dqk + Dv)``.

    ``heads`` is the number of query heads (grouped-query attention repeats key/value heads).
    """
    dim_v = dim_qk if dim_v is None else dim_v
    return 2 * batch * heads * len_q * len_k * (dim_qk + dim_v)


def sdpa_backward_flops(batch: int, heads: int, len_q: int, len_k: int, dim_qk: int, dim_v: int | None = None) -> int:
    """Backward FLOPs (four gradient matmuls, no recomputation): 2x :func:`sdpa_flops`."""
    return 2 * sdpa_flops(batch, heads, len_q, len_k, dim_qk, dim_v)


def selective_scan_flops(batch: int, dim: int, length: int, state: int) -> int:
    """Forward FLOPs of the fused scan kernel, ``B D L (7N + 1)`` (see the module docstring)."""
    return batch * dim * length * (7 * state + 1)


def selective_scan_backward_flops(batch: int, dim: int, length: int, state: int) -> int:
    """Backward FLOPs of the fused scan kernel without its recomputation, ``B D (L (18N + 1) - 7N)``."""
    if length == 0:
        return 0
    return batch * dim * (length * (18 * state + 1) - 7 * state)


def _attention_dims(query_shape, key_shape, value_shape) -> tuple[int, int, int, int, int, int]:
    """``(B, H, Lq, Lk, Dqk, Dv)`` from the 4-D shapes the fused attention operators take."""
    b, h, lq, dqk = query_shape
    lk, dv = key_shape[2], value_shape[3]
    return b, h, lq, lk, dqk, dv


def _sdpa_forward_formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flops(*_attention_dims(query_shape, key_shape, value_shape))


def _sdpa_backward_formula(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flops(*_attention_dims(query_shape, key_shape, value_shape))


def _scan_forward_formula(u_shape, dt_shape, A_shape, Bt_shape, Ct_shape, *args, out_shape=None, **kwargs) -> int:
    nb, nd, L = u_shape
    return selective_scan_flops(nb, nd, L, A_shape[1])


def _scan_backward_formula(u_shape, dt_shape, A_shape, Bt_shape, Ct_shape, *args, out_shape=None, **kwargs) -> int:
    nb, nd, L = u_shape
    return selective_scan_backward_flops(nb, nd, L, A_shape[1])


#: Operator -> shape formula, passed to ``FlopCounterMode(custom_mapping=...)`` by :func:`flop_counter`.
FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_forward_formula,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_formula,
    # CUDA kernels: torch's forward formulas are the same count; its backward ones include the
    # flash recomputation of QK^T (see the module docstring), replaced by the model-FLOP count.
    aten._scaled_dot_product_efficient_attention_backward: _sdpa_backward_formula,
    aten._scaled_dot_product_flash_attention_backward: _sdpa_backward_formula,
    aten._scaled_dot_product_cudnn_attention_backward: _sdpa_backward_formula,
    torch.ops.recon3d.selective_scan_fwd: _scan_forward_formula,
    torch.ops.recon3d.selective_scan_bwd: _scan_backward_formula,
}


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: every count goes to ``"Global"`` only."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def flop_counter(
    display: bool = False, depth: int = 2, per_module: bool = False, formulas: dict[Any, Callable[..., int]] | None = None
) -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts CPU attention and the fused scan kernel.

    Use as ``with flop_counter() as fc: loss.backward(); fc.get_total_flops()``. ``formulas``
    replaces :data:`FLOP_FORMULAS` (``{}``: torch's own registry only, for comparisons).

    ``per_module=False`` (default) keeps the total only: FlopCounterMode's per-module breakdown
    (``torch.utils.module_tracker``) hooks every module call and fails with "Expected gradient
    function to be set" when a module is called inside ``no_grad`` on a view of a tensor that
    requires grad (M3D's full stage does, in the renderer's coarse pass). ``True`` keeps it.
    """
    fc = FlopCounterMode(display=display, depth=depth, custom_mapping=dict(FLOP_FORMULAS if formulas is None else formulas))
    if not per_module and hasattr(fc, "mod_tracker"):
        fc.mod_tracker = _GlobalOnly()
    return fc


def matmul_peak(n: int = 1024, reps: int = 10, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Measured ``n x n`` matmul FLOP/s on ``device`` (best of ``reps``): the denominator of an MFU
    figure, measured in the same run as the step it is compared with (the machine's load varies)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
