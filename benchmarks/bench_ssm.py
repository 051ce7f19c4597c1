"""Benchmark: recon3d's chunked selective scan vs a sequential loop, and mixer vs self-attention cost.

Run: ``.venv/bin/python benchmarks/bench_ssm.py [--quick]`` (CPU; the thread count is printed).

1. Selective scan (B=1, D=256, N=16, float32, forward) at L = 1024 / 4096 / 16384, the torch
   chunked scan and the fused C kernel (``fused_cpu``; ``mamba_ssm`` with ``--device cuda``) against
   the sequential reference (mamba_ssm's ``selective_scan_ref`` recurrence, re-written below: decays
   precomputed, one Python step per time step). For L = 16384 (and every L above 4096 in
   ``--quick``) the reference is timed on a 4096-step slice and extrapolated linearly, which the
   output says. Then forward + backward of the fast backend against the torch scan.
2. Cost of one MixerBlock (4-direction SSM + conv) vs one self-attention block (sdpa) as the
   token count grows x4 per row: a linear cost grows ~x4, a quadratic one towards ~x16.
3. The paper-scale Selective Attention Module, forward + backward, torch scan vs ``auto``; FLOPs
   per step (``recon3d.models.flops``, which counts CPU attention and the fused kernel) and their
   ratio to the fp32 matmul peak measured in the same run (a CPU "MFU").
"""

from __future__ import annotations

import argparse
import math
import time

import torch


def sequential_scan(u, delta, A, B, C):
    """The plain recurrence, one step per Python iteration (the reference being raced)."""
    dA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    dBu = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for i in range(u.shape[2]):
        h = dA[:, :, i] * h + dBu[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, i]))
    return torch.stack(ys, 2)


def _time(fn, repeats: int, *args) -> float:
    sync = torch.cuda.synchronize if any(getattr(a, "is_cuda", False) for a in args) else (lambda: None)
    fn(*args)  # warm-up
    sync()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def _scan(backend):
    from recon3d.models.ssm import selective_scan

    return lambda u, delta, A, B, C: selective_scan(u, delta, A, B, C, backend=backend)


def _fwd_bwd(backend):
    from recon3d.models.ssm import selective_scan

    def run(u, delta, A, B, C):
        leaves = [t.detach().requires_grad_() for t in (u, delta, A, B, C)]
        selective_scan(*leaves, backend=backend).square().mean().backward()

    return run


def _inputs(L: int, d: int, n: int, device: str):
    g = torch.Generator().manual_seed(L)
    u = torch.randn(1, d, L, generator=g).to(device)
    delta = torch.nn.functional.softplus(torch.randn(1, d, L, generator=g) - 3).to(device)
    A = -torch.exp(torch.rand(d, n, generator=g) * math.log(16)).to(device)
    B, C = torch.randn(1, n, L, generator=g).to(device), torch.randn(1, n, L, generator=g).to(device)
    return u, delta, A, B, C


def bench_scan(quick: bool, device: str = "cpu") -> None:
    from recon3d.models.ssm.selective_scan import _fused_cpu_probe  # None when the C kernel builds here

    d, n = 256, 16
    where = f"{torch.get_num_threads()} CPU threads" if device == "cpu" else torch.cuda.get_device_name()
    fast = "fused_cpu" if device == "cpu" else "mamba_ssm"
    have_fast = _fused_cpu_probe() is None if device == "cpu" else _mamba_ok()
    print(f"\n[1] selective scan, B=1 D={d} N={n} float32 forward, {where} (best of runs)")
    print("    speed-up = sequential reference time / backend time, both measured in this run")
    print(f"{'L':>6} {'sequential ms':>14} {'torch ms':>9} {'x':>6} {fast + ' ms':>13} {'x':>6}  note")
    for L in (1024, 4096, 16384):
        u, delta, A, B, C = _inputs(L, d, n, device)
        with torch.no_grad():
            t_torch = _time(_scan("torch"), 1 if quick else 3, u, delta, A, B, C)
            t_fast = _time(_scan(fast), 1 if quick else 5, u, delta, A, B, C) if have_fast else math.nan
            ref_len = L if (L <= 4096 and not (quick and L > 1024)) else (1024 if quick else 4096)
            part = [t[..., :ref_len] for t in (u, delta)] + [A] + [t[..., :ref_len] for t in (B, C)]
            ref = _time(sequential_scan, 1, *part) * (L / ref_len)
            y_ref = sequential_scan(*part)
            errs = [float((_scan(b)(*part) - y_ref).abs().max()) for b in ("torch", fast) if b == "torch" or have_fast]
        note = f"reference timed on {ref_len} steps, x{L // ref_len} extrapolated" if ref_len < L else "measured"
        print(f"{L:>6} {ref * 1e3:>14.1f} {t_torch * 1e3:>9.1f} {ref / t_torch:>5.1f}x {t_fast * 1e3:>13.1f} {ref / t_fast:>5.1f}x"
              f"  {note}; max|diff| torch {errs[0]:.1e}" + (f", {fast} {errs[1]:.1e}" if len(errs) > 1 else f", {fast} unavailable"))
    if have_fast:
        print(f"\n    forward + backward (autograd), {fast} vs the torch chunked scan")
        print(f"{'L':>6} {'torch ms':>9} {fast + ' ms':>13} {'x':>6}")
        for L in (1024, 4096) if quick else (1024, 4096, 16384):
            u, delta, A, B, C = _inputs(L, d, n, device)
            t_torch = _time(_fwd_bwd("torch"), 1 if quick else 2, u, delta, A, B, C)
            t_fast = _time(_fwd_bwd(fast), 1 if quick else 3, u, delta, A, B, C)
            print(f"{L:>6} {t_torch * 1e3:>9.1f} {t_fast * 1e3:>13.1f} {t_torch / t_fast:>5.1f}x")


def _mamba_ok() -> bool:
    from recon3d.models.ssm import mamba_ssm_available

    return mamba_ssm_available()


def bench_mixer_vs_attention(quick: bool, device: str = "cpu") -> None:
    from recon3d.models.m3d.selective_attention import AttentionBlock, MixerBlock

    dim = 64
    mixer = MixerBlock(dim, d_state=8, directions=4, backend="auto").eval().to(device)
    attn = AttentionBlock(dim, num_heads=4).eval().to(device)
    sides = [(16, 16), (32, 32), (64, 64)] + ([] if quick else [(128, 128)])
    print(f"\n[2] one block, dim={dim}, forward on {device}: mixer (4-direction SSM + conv, scan backend auto) vs self-attention (sdpa)")
    print(f"{'tokens':>7} {'mixer ms':>9} {'x prev':>7} {'attn ms':>9} {'x prev':>7} {'attn/mixer':>10}")
    prev = None
    for h, w in sides:
        x = torch.randn(1, dim, h, w, device=device)
        with torch.no_grad():
            tm = _time(mixer, 1 if quick else 2, x)
            ta = _time(attn, 1 if quick else 2, x)
        gm = f"{tm / prev[0]:.1f}" if prev else "-"
        ga = f"{ta / prev[1]:.1f}" if prev else "-"
        print(f"{h * w:>7} {tm * 1e3:>9.1f} {gm:>7} {ta * 1e3:>9.1f} {ga:>7} {ta / tm:>10.2f}")
        prev = (tm, ta)
    print("tokens grow x4 per row: linear cost -> 'x prev' ~4, quadratic -> towards ~16")


def bench_deep_encoder(quick: bool, device: str = "cpu") -> None:
    """The paper-scale Selective Attention Module (configs/m3d.yaml: dim 256, depths 8+4, 64x64 ROI / patch 4)."""
    from recon3d.models.m3d.selective_attention import SelectiveAttentionModule

    b = 1 if quick else 2
    print(f"\n[3] paper-scale SelectiveAttentionModule (dim 256, depths [8, 4], 16x16 tokens), batch {b}, "
          f"forward + backward on {device}")
    x = torch.randn(b, 256, 16, 16, device=device)
    from recon3d.models.flops import flop_counter, matmul_peak

    times, counts = {}, {}
    for backend in ("torch", "auto"):
        torch.manual_seed(0)
        sam = SelectiveAttentionModule(256, depths=[8, 4], num_heads=8, d_state=8, backend=backend).to(device)

        def step(sam=sam):
            sam.zero_grad(set_to_none=True)
            sam(x).square().mean().backward()

        times[backend] = _time(step, 1 if quick else 2)
        if backend == "auto":
            for name, formulas in (("torch", {}), ("recon3d", None)):
                with flop_counter(formulas=formulas) as fc:
                    step()
                counts[name] = fc.get_total_flops()
    print(f"scan torch {times['torch'] * 1e3:.0f} ms, scan auto {times['auto'] * 1e3:.0f} ms: "
          f"x{times['torch'] / times['auto']:.2f} for the whole module")
    peak = matmul_peak(device=device)
    f = counts["recon3d"]
    print(f"scan auto: {f / 1e9:.2f} GFLOP per step (recon3d.models.flops; torch FlopCounterMode alone "
          f"{counts['torch'] / 1e9:.2f}: no CPU attention, no scan kernel), {f / times['auto'] / 1e9:.1f} GFLOP/s; "
          f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s; MFU {f / times['auto'] / peak:.3f}")


def main(quick: bool = False, device: str = "cpu") -> None:
    """Run the benchmarks and print the ratios measured in this run."""
    torch.manual_seed(0)
    bench_scan(quick, device)
    bench_mixer_vs_attention(quick, device)
    bench_deep_encoder(quick, device)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, single runs")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    main(a.quick, a.device)
