"""Benchmark: recon3d's sparse ops — submanifold conv vs dense ``conv3d`` and spconv, sparse attention memory.

Run: ``.venv/bin/python benchmarks/bench_sparse.py [--quick] [--threads 2] [--part conv|attention]`` (CPU).

1. Submanifold 3x3x3 conv on one 64^3 grid (``--quick``: 32^3) at 1 %, 5 %, 20 % random
   occupancy (plus a one-voxel-thick sphere shell, the surface voxels TRELLIS works on), C = 32
   and C = 128 in and out, forward, float32. Columns: dense ``F.conv3d`` on the full grid (its
   cost does not depend on occupancy: timed once per C), recon3d's ``torch`` backend on the first
   call on new coordinates (builds the neighbour map) and cached (the map reused, as in
   consecutive layers), spconv's CPU build (``spconv`` backend: first call builds its indice
   pairs, cached reuses them), all best-of-``repeats``; ratios ``dense / ours`` (goal > 1 at
   <= 5 %) and ``ours / spconv`` (goal <= 2). spconv's CPU build must run on one intra-op thread
   (it returns wrong rows with two, see ``recon3d.models.sparse.conv``), so it is timed on one
   thread, and ours is timed on the benchmark's threads and on one thread (the like-for-like
   comparison with spconv).
2. Sparse full attention over 4k-32k voxels split into 8 objects of unequal size (8:4:4:2:2:1:1:1),
   4 heads of 32: peak resident memory added by the call (``VmHWM`` reset right before, each
   variant in a fresh process so freed pages of one do not hide the next) and time, for
   recon3d's packed ``varlen_attention`` (torch backend), padding every object to the longest
   with a key mask (one SDPA call), and one block-diagonal ``N x N`` mask (up to 16k voxels).

The machine is shared: the load average is printed with the results. As in ``bench_render``,
``OMP_WAIT_POLICY`` is set to ``PASSIVE`` before torch is imported unless already set: with
OpenMP's spinning default and oversubscribed cores, the conv's dozens of small parallel ops each
wait for a descheduled thread (measured here at load 6 on 2 cores: 5 % / C = 32 took 500 ms with
2 threads instead of 6 ms).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import math  # noqa: E402
import multiprocessing as mp  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _load() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


def _best(fn, repeats: int, setup=None) -> float:
    """Best wall time of ``repeats`` calls (``setup()`` before each, untimed), after one warm-up."""
    if setup:
        setup()
    fn()
    best = math.inf
    for _ in range(repeats):
        if setup:
            setup()
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def make_voxels(resolution: int, occupancy: float | str, channels: int, seed: int = 0):
    """One object: random voxels at ``occupancy`` or ``"shell"`` (a sphere shell of radius 0.45 R)."""
    from recon3d.representations import SparseVoxels

    g = torch.Generator().manual_seed(seed)
    if occupancy == "shell":
        ax = torch.arange(resolution, dtype=torch.float32) + 0.5 - resolution / 2
        r = torch.sqrt(ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2)
        occ = (r - 0.45 * resolution).abs() < 0.5
    else:
        occ = torch.rand(resolution, resolution, resolution, generator=g) < occupancy
    xyz = occ.nonzero()
    coords = torch.cat([torch.zeros(xyz.shape[0], 1, dtype=xyz.dtype), xyz], 1).int()
    return SparseVoxels(coords, torch.randn(xyz.shape[0], channels, generator=g), resolution, 1)


def _fresh(v):
    """The same voxels on a new coordinate tensor (an empty cache: the first-call cost)."""
    return v.replace(coords=v.coords.clone())


def conv_case(res: int, occ, c: int, threads: int, repeats: int, t_dense: float, spconv: bool) -> dict:
    """Times of one (occupancy, channels) case; ``t_dense`` is the dense conv's (shared per C)."""
    from recon3d.models.sparse import submanifold_conv3d

    g = torch.Generator().manual_seed(c)
    w = torch.randn(c, 3, 3, 3, c, generator=g) * (1.0 / math.sqrt(27 * c))
    b = torch.randn(c, generator=g)
    v = make_voxels(res, occ, c)
    state: dict = {}
    mods: dict = {}

    def fresh():
        state["v"] = _fresh(v)

    torch.set_num_threads(threads)
    t_first = _best(lambda: submanifold_conv3d(state["v"], w, b, "torch"), repeats, setup=fresh)
    t_ours = _best(lambda: submanifold_conv3d(v, w, b, "torch"), repeats)
    torch.set_num_threads(1)
    t_ours1 = _best(lambda: submanifold_conv3d(v, w, b, "torch"), repeats)
    torch.set_num_threads(threads)
    t_sp_first = t_sp = float("nan")
    if spconv:
        t_sp_first = _best(lambda: submanifold_conv3d(state["v"], w, b, "spconv", mods), repeats, setup=fresh)
        t_sp = _best(lambda: submanifold_conv3d(v, w, b, "spconv", mods), repeats)
    occ_s = f"{occ * 100:.0f} %" if occ != "shell" else f"shell {v.num_voxels / res**3 * 100:.1f}%"
    return dict(occupancy=occ_s, channels=c, voxels=v.num_voxels, dense=t_dense, first=t_first, ours=t_ours,
                ours_1t=t_ours1, spconv_first=t_sp_first, spconv=t_sp)


def dense_conv_time(res: int, c: int, repeats: int) -> float:
    g = torch.Generator().manual_seed(c)
    x = torch.randn(1, c, res, res, res, generator=g)
    w = torch.randn(c, c, 3, 3, 3, generator=g)
    return _best(lambda: F.conv3d(x, w, padding=1), repeats)


def bench_conv(quick: bool, threads: int) -> list[dict]:
    from recon3d.models.sparse import has_spconv

    res = 32 if quick else 64
    repeats = 2 if quick else 5
    spconv = has_spconv()
    rows = []
    print(f"\n[conv] submanifold 3x3x3, {res}^3 grid, forward float32, {threads} threads (spconv: 1 thread), best of {repeats}; {_load()}")
    if not spconv:
        print("  spconv not importable here: its columns are skipped (pip install 'recon3d[sparse]')")
    print(f"{'occupancy':>11} {'C':>4} {'voxels':>7} | {'dense':>9} | {'ours 1st':>9} {'ours':>9} {'ours 1t':>9} | "
          f"{'spconv 1st':>10} {'spconv':>9} | {'dense/ours':>10} {'dense/ours1t':>12} {'ours/spconv':>11} {'ours1t/spconv':>13}")
    with torch.no_grad():
        for c in (32, 128):
            torch.set_num_threads(threads)
            t_dense = dense_conv_time(res, c, max(1, repeats // 2))
            for occ in (0.01, 0.05, 0.2, "shell"):
                r = conv_case(res, occ, c, threads, repeats, t_dense, spconv)
                rows.append(r)
                print(f"{r['occupancy']:>11} {c:>4} {r['voxels']:>7} | {t_dense * 1e3:>7.1f}ms | {r['first'] * 1e3:>7.1f}ms {r['ours'] * 1e3:>7.1f}ms "
                      f"{r['ours_1t'] * 1e3:>7.1f}ms | {r['spconv_first'] * 1e3:>8.1f}ms {r['spconv'] * 1e3:>7.1f}ms | "
                      f"{t_dense / r['ours']:>9.1f}x {t_dense / r['ours_1t']:>11.1f}x {r['ours'] / r['spconv']:>10.2f}x {r['ours_1t'] / r['spconv']:>12.2f}x", flush=True)
    torch.set_num_threads(threads)
    print("  ours/spconv compares cached calls (both reuse their pairs); 1st = new coordinates (map / pairs built).")
    return rows


# ------------------------------------------------------------------------------------ attention
def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _attention_child(variant: str, n: int, heads: int, dim: int, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    from recon3d.models.sparse import varlen_attention

    parts = torch.tensor([8, 4, 4, 2, 2, 1, 1, 1], dtype=torch.float64)
    lens = (parts / parts.sum() * n).floor().long()
    lens[0] += n - int(lens.sum())
    lens = lens.tolist()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, heads, dim, generator=g) for _ in range(3))
    starts = [0]
    for length in lens:
        starts.append(starts[-1] + length)

    def packed():
        return varlen_attention(q, k, v, lens, backend="torch")

    def padded():
        lmax = max(lens)
        b = len(lens)
        qp, kp, vp = (x.new_zeros(b, lmax, heads, dim) for x in (q, k, v))
        for i, length in enumerate(lens):
            qp[i, :length], kp[i, :length], vp[i, :length] = q[starts[i] : starts[i + 1]], k[starts[i] : starts[i + 1]], v[starts[i] : starts[i + 1]]
        mask = (torch.arange(lmax)[None] < torch.tensor(lens)[:, None])[:, None, None, :]
        o = F.scaled_dot_product_attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), attn_mask=mask)
        return torch.cat([o[i, :, :length].transpose(0, 1) for i, length in enumerate(lens)])

    def blockdiag():
        seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        mask = seg[:, None] == seg[None, :]
        return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask)[0].transpose(0, 1)

    fn = {"packed": packed, "padded": padded, "blockdiag": blockdiag}[variant]
    ref = packed() if variant != "packed" else None
    before = _status_mb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    peak = _status_mb("VmHWM")
    err = 0.0 if ref is None else float((out - ref).abs().max())
    queue.put(dict(variant=variant, voxels=n, seconds=seconds, added_mb=peak - before, inputs_mb=3 * q.numel() * 4 / 2**20, err=err, lens=lens))


def bench_attention(quick: bool, threads: int) -> list[dict]:
    sizes = (4096, 8192) if quick else (4096, 8192, 16384, 32768)
    heads, dim = 4, 32
    print(f"\n[attention] full self-attention, 8 objects (8:4:4:2:2:1:1:1), {heads} heads x {dim}, float32, {threads} threads, one call each in a fresh process; {_load()}")
    print(f"{'voxels':>7} {'variant':>10} | {'time':>8} | {'peak +MB':>9} | {'q,k,v MB':>8} | {'max |diff| vs packed':>20}")
    ctx = mp.get_context("spawn")
    rows = []
    for n in sizes:
        for variant in ("packed", "padded", "blockdiag"):
            if variant == "blockdiag" and n > 16384:
                print(f"{n:>7} {variant:>10} | skipped: the N x N mask alone is {n * n / 2**30:.1f} GiB (bool)")
                continue
            queue = ctx.Queue()
            p = ctx.Process(target=_attention_child, args=(variant, n, heads, dim, threads, queue))
            p.start()
            p.join()
            if p.exitcode != 0:
                print(f"{n:>7} {variant:>10} | failed (exit code {p.exitcode})")
                continue
            r = queue.get()
            rows.append(r)
            print(f"{n:>7} {variant:>10} | {r['seconds']:>7.2f}s | {r['added_mb']:>9.0f} | {r['inputs_mb']:>8.0f} | {r['err']:>20.1e}", flush=True)
    return rows


def main(quick: bool = False, threads: int = 2, part: str = "all") -> None:
    torch.set_num_threads(threads)
    print(f"bench_sparse: torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; {_load()}")
    if part in ("all", "conv"):
        bench_conv(quick, threads)
    if part in ("all", "attention"):
        bench_attention(quick, threads)
    print(f"\ndone; {_load()}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--part", choices=("all", "conv", "attention"), default="all")
    a = ap.parse_args()
    main(a.quick, a.threads, a.part)
