"""Benchmark: recon3d's chunked selective scan vs a sequential loop, and mixer vs self-attention cost.

Run: ``.venv/bin/python benchmarks/bench_ssm.py [--quick]`` (CPU; the thread count is printed).

1. Selective scan (B=1, D=256, N=16, float32, forward) at L = 1024 / 4096 / 16384 against the
   sequential reference (mamba_ssm's ``selective_scan_ref`` recurrence, re-written below: decays
   precomputed, one Python step per time step). For L = 16384 (and every L above 4096 in
   ``--quick``) the reference is timed on a 4096-step slice and extrapolated linearly, which the
   output says.
2. Cost of one MixerBlock (4-direction SSM + conv) vs one self-attention block (sdpa) as the
   token count grows x4 per row: a linear cost grows ~x4, a quadratic one towards ~x16.
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


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_scan(quick: bool) -> None:
    from recon3d.models.ssm import selective_scan

    d, n = 256, 16
    print(f"\n[1] selective scan, B=1 D={d} N={n} float32 forward, {torch.get_num_threads()} threads (best of runs)")
    print(f"{'L':>6} {'sequential ms':>14} {'chunked ms':>11} {'speed-up':>9}  note")
    for L in (1024, 4096, 16384):
        g = torch.Generator().manual_seed(L)
        u = torch.randn(1, d, L, generator=g)
        delta = torch.nn.functional.softplus(torch.randn(1, d, L, generator=g) - 3)
        A = -torch.exp(torch.rand(d, n, generator=g) * math.log(16))
        B, C = torch.randn(1, n, L, generator=g), torch.randn(1, n, L, generator=g)
        with torch.no_grad():
            ours = _time(lambda: selective_scan(u, delta, A, B, C, backend="torch"), 1 if quick else 3)
            ref_len = L if (L <= 4096 and not (quick and L > 1024)) else (1024 if quick else 4096)
            sl = slice(0, ref_len)
            ref = _time(lambda: sequential_scan(u[..., sl], delta[..., sl], A, B[..., sl], C[..., sl]), 1) * (L / ref_len)
            err = (selective_scan(u[..., sl], delta[..., sl], A, B[..., sl], C[..., sl], backend="torch")
                   - sequential_scan(u[..., sl], delta[..., sl], A, B[..., sl], C[..., sl])).abs().max()
        note = f"reference timed on {ref_len} steps, x{L // ref_len} extrapolated" if ref_len < L else "measured"
        print(f"{L:>6} {ref * 1e3:>14.1f} {ours * 1e3:>11.1f} {ref / ours:>8.1f}x  {note}; max|diff|={float(err):.1e}")


def bench_mixer_vs_attention(quick: bool) -> None:
    from recon3d.models.m3d.selective_attention import AttentionBlock, MixerBlock

    dim = 64
    mixer, attn = MixerBlock(dim, d_state=8, directions=4, backend="torch").eval(), AttentionBlock(dim, num_heads=4).eval()
    sides = [(16, 16), (32, 32), (64, 64)] + ([] if quick else [(128, 128)])
    print(f"\n[2] one block, dim={dim}, forward on CPU: mixer (4-direction SSM + conv) vs self-attention (sdpa)")
    print(f"{'tokens':>7} {'mixer ms':>9} {'x prev':>7} {'attn ms':>9} {'x prev':>7} {'attn/mixer':>10}")
    prev = None
    for h, w in sides:
        x = torch.randn(1, dim, h, w)
        with torch.no_grad():
            tm = _time(lambda: mixer(x), 1 if quick else 2)
            ta = _time(lambda: attn(x), 1 if quick else 2)
        gm = f"{tm / prev[0]:.1f}" if prev else "-"
        ga = f"{ta / prev[1]:.1f}" if prev else "-"
        print(f"{h * w:>7} {tm * 1e3:>9.1f} {gm:>7} {ta * 1e3:>9.1f} {ga:>7} {ta / tm:>10.2f}")
        prev = (tm, ta)
    print("tokens grow x4 per row: linear cost -> 'x prev' ~4, quadratic -> towards ~16")


def main(quick: bool = False) -> None:
    """Run both benchmarks and print the ratios measured in this run."""
    torch.manual_seed(0)
    bench_scan(quick)
    bench_mixer_vs_attention(quick)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, single runs")
    main(ap.parse_args().quick)
