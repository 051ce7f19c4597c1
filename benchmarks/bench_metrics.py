"""Metric benchmarks: each timed against a reference measured in the same run (ratios, not absolutes).

- Chamfer + F-score, 2 x 100k points on CPU: KD-tree (``backend="kdtree"``) vs brute-force
  chunked ``torch.cdist`` (``backend="torch"``); also checks both give the same numbers.
- ICP of 16k points (rotation search off / on) vs one brute-force nearest-neighbour pass.
- LPIPS-VGG at 256^2, batch 8, CPU (random weights; timing only) vs a plain VGG16 trunk forward.

Run: ``.venv/bin/python -c "from benchmarks.bench_metrics import main; main()"`` or
``.venv/bin/python benchmarks/bench_metrics.py [--quick]``.
"""

from __future__ import annotations

import sys
import time

import torch


def _time(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(quick: bool = False) -> None:
    """Print a table of timings and ratios. ``quick`` shrinks every size (~seconds)."""
    from recon3d.metrics import LPIPSNet, align_points, chamfer_fscore, nearest_neighbors
    from recon3d.metrics.lpips import VGG16Features

    torch.manual_seed(0)
    rows = []
    n = 10_000 if quick else 100_000
    a = torch.rand(n, 3)
    b = a + 0.01 * torch.randn(n, 3)
    res = {}
    t_kd = _time(lambda: res.__setitem__("kd", chamfer_fscore(a, b, threshold=0.01, backend="kdtree")))
    t_bf = _time(lambda: res.__setitem__("bf", chamfer_fscore(a, b, threshold=0.01, backend="torch")))
    same = all(abs(float(res["kd"][k]) - float(res["bf"][k])) < 1e-6 for k in ("cd", "fscore"))
    rows.append((f"CD+F {n // 1000}k vs {n // 1000}k, KD-tree", t_kd, f"cdist chunked {t_bf:.3f}s", t_bf / t_kd, f"same={same}"))

    m = 4_000 if quick else 16_000
    src = torch.rand(m, 3) * 2 - 1
    c, s = 0.9848, 0.1736  # 10 degrees
    rot = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    dst = src @ rot.T + 0.05
    t_nn = _time(lambda: nearest_neighbors(src.double(), dst.double(), "kdtree"), repeat=3)
    t_icp = _time(lambda: align_points(src, dst, mode="icp", rotation_search=False), repeat=2)
    t_icp_s = _time(lambda: align_points(src, dst, mode="icp", rotation_search=True, generator=torch.Generator().manual_seed(0)))
    rows.append((f"ICP {m // 1000}k pts (no search)", t_icp, f"1 NN pass {t_nn:.4f}s", t_icp / t_nn, "ratio = NN-pass equivalents"))
    rows.append((f"ICP {m // 1000}k pts + 24-rot search", t_icp_s, f"1 NN pass {t_nn:.4f}s", t_icp_s / t_nn, ""))

    size, batch = (64, 2) if quick else (256, 8)
    net = LPIPSNet("vgg", pretrained=False)
    x, y = torch.rand(batch, 3, size, size), torch.rand(batch, 3, size, size)
    trunk = VGG16Features().eval()
    with torch.no_grad():
        t_tr = _time(lambda: trunk(torch.cat([x, y])), repeat=2)
        t_lp = _time(lambda: net(x, y), repeat=2)
    rows.append((f"LPIPS-VGG {size}^2 x{batch} (random w.)", t_lp, f"VGG16 trunk on 2x{batch} {t_tr:.3f}s", t_lp / t_tr, "overhead of heads/normalise"))

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, quick={quick}")
    print(f"{'benchmark':40s} {'time [s]':>9s}  {'reference':30s} {'ratio ref/ours or ours/ref':>26s}  note")
    for name, t, ref, ratio, note in rows:
        print(f"{name:40s} {t:9.3f}  {ref:30s} {ratio:26.2f}  {note}")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
