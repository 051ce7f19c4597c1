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


def _ours(u, delta, A, B, C):
    from recon3d.models.ssm import selective_scan

    return selective_scan(u, delta, A, B, C, backend="torch")


def bench_scan(quick: bool, device: str = "cpu") -> None:
    d, n = 256, 16
    where = f"{torch.get_num_threads()} CPU threads" if device == "cpu" else torch.cuda.get_device_name()
    print(f"\n[1] selective scan, B=1 D={d} N={n} float32 forward, {where} (best of runs)")
    print(f"{'L':>6} {'sequential ms':>14} {'chunked ms':>11} {'speed-up':>9}  note")
    for L in (1024, 4096, 16384):
        g = torch.Generator().manual_seed(L)
        u = torch.randn(1, d, L, generator=g).to(device)
        delta = torch.nn.functional.softplus(torch.randn(1, d, L, generator=g) - 3).to(device)
        A = -torch.exp(torch.rand(d, n, generator=g) * math.log(16)).to(device)
        B, C = torch.randn(1, n, L, generator=g).to(device), torch.randn(1, n, L, generator=g).to(device)
        with torch.no_grad():
            ours = _time(_ours, 1 if quick else 3, u, delta, A, B, C)
            ref_len = L if (L <= 4096 and not (quick and L > 1024)) else (1024 if quick else 4096)
            part = [t[..., :ref_len] for t in (u, delta)] + [A] + [t[..., :ref_len] for t in (B, C)]
            ref = _time(sequential_scan, 1, *part) * (L / ref_len)
            err = (_ours(*part) - sequential_scan(*part)).abs().max()
        note = f"reference timed on {ref_len} steps, x{L // ref_len} extrapolated" if ref_len < L else "measured"
        print(f"{L:>6} {ref * 1e3:>14.1f} {ours * 1e3:>11.1f} {ref / ours:>8.1f}x  {note}; max|diff|={float(err):.1e}")


def bench_mixer_vs_attention(quick: bool, device: str = "cpu") -> None:
    from recon3d.models.m3d.selective_attention import AttentionBlock, MixerBlock

    dim = 64
    mixer = MixerBlock(dim, d_state=8, directions=4, backend="torch").eval().to(device)
    attn = AttentionBlock(dim, num_heads=4).eval().to(device)
    sides = [(16, 16), (32, 32), (64, 64)] + ([] if quick else [(128, 128)])
    print(f"\n[2] one block, dim={dim}, forward on {device}: mixer (4-direction SSM + conv) vs self-attention (sdpa)")
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


def main(quick: bool = False, device: str = "cpu") -> None:
    """Run both benchmarks and print the ratios measured in this run."""
    torch.manual_seed(0)
    bench_scan(quick, device)
    bench_mixer_vs_attention(quick, device)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, single runs")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    main(a.quick, a.device)
