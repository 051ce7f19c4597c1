"""Renderer benchmarks on CPU: each figure is printed with a ratio against a reference measured in
the same run (never a fixed number). Run: ``python benchmarks/bench_render.py [--quick]``.

Every timed call is preceded by an untimed warm-up call (first-call allocation and lazy
initialisation are not what is measured). On a shared machine torch's OpenMP threads spin-wait
at every parallel op and, once the cores are oversubscribed, stall each other (10-25x slower
runs); unless ``OMP_WAIT_POLICY`` is already set, it is set to ``PASSIVE`` here before torch is
imported (printed in the header; ``OMP_WAIT_POLICY=ACTIVE`` restores OpenMP's default).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from recon3d.data.cameras import orbit_cameras
from recon3d.render import (
    Gaussians,
    LaplaceDensity,
    TorchGaussianRasterizer,
    TorchMeshRasterizer,
    VolumeRenderer,
    grid_points,
    marching_cubes,
)
from recon3d.render.gaussians.torch_rasterizer import project_gaussians


def _timed(fn, repeat: int = 1, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def _lgm_like(n: int, seed: int = 0) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g)
    return Gaussians((r(1, n, 3) - 0.5) * 0.9, torch.randn(1, n, 4, generator=g), r(1, n, 3) * 0.01 + 0.003, r(1, n), r(1, n, 3))


def naive_composite(g: Gaussians, cams, pixel_rows: slice) -> torch.Tensor:
    """Per-pixel compositor: every pixel against every projected Gaussian, sorted by depth (the baseline).

    The same EWA projection as the rasterizer (gsplat's torch reference pieces), then each pixel
    composites all Gaussians front to back with gsplat's alpha rules; returns rgb and depth
    ``(V, pixels, 4)`` so that it computes what the rasterizer is timed on.
    """
    p = project_gaussians(g, cams)
    out = []
    for i in range(p["means2d"].shape[0]):
        order = torch.argsort(p["depths"][i])
        m, con, op, val = p["means2d"][i][order], p["conics"][i][order], p["opacities"][i][order], p["valid"][i][order]
        col = torch.cat([g.colors[0][order], p["depths"][i][order, None]], -1)
        ys = torch.arange(cams.height)[pixel_rows].float() + 0.5
        xs = torch.arange(cams.width).float() + 0.5
        pix = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
        d = m[None] - pix[:, None]
        sig = 0.5 * (con[:, 0] * d[..., 0] ** 2 + con[:, 2] * d[..., 1] ** 2) + con[:, 1] * d[..., 0] * d[..., 1]
        a = (op * torch.exp(-sig)).clamp(max=0.999) * val
        a = torch.where(a >= 1 / 255, a, torch.zeros_like(a))
        T = torch.cumprod(torch.cat([torch.ones_like(a[:, :1]), 1 - a[:, :-1]], 1), 1)
        out.append(((a * T)[..., None] * col).sum(1))
    return torch.stack(out)


def bench_gaussians(quick: bool) -> list[tuple]:
    n, size, views = (8192, 128, 2) if quick else (65536, 256, 4)
    g = _lgm_like(n)
    cams = orbit_cameras(torch.linspace(0, 270, views), torch.full((views,), 20.0), 2.5, 40, size, size).reshape(1, views)
    means = g.means.clone().requires_grad_(True)
    gg = Gaussians(means, g.quats, g.scales, g.opacities, g.colors)
    r = TorchGaussianRasterizer()

    def fwd_bwd():
        out = r(gg, cams)
        (out["rgb"].sum() + out["depth"].sum()).backward()

    rss0 = _rss_mb()
    t_tile = _timed(fwd_bwd)
    peak = _peak_mb()
    # The naive compositor is O(pixels x Gaussians) per pixel, the same for every pixel: time
    # forward + backward on a band of rows and scale to the whole image.
    rows = 1 if not quick else 4
    nm = g.means.clone().requires_grad_(True)
    ng = Gaussians(nm, g.quats, g.scales, g.opacities, g.colors)
    t_naive_band = _timed(lambda: naive_composite(ng, cams, slice(size // 2, size // 2 + rows)).sum().backward())
    t_naive = t_naive_band * size / rows
    return [
        ("gaussians torch tiles fwd+bwd", f"{n} G, {views}x{size}²", f"{t_tile:.2f} s", f"peak RSS {peak:.0f} MB (RSS before {rss0:.0f} MB)"),
        ("gaussians naive per-pixel fwd+bwd (extrap.)", f"{n} G, {views}x{size}²", f"{t_naive:.1f} s", f"tiles speed-up {t_naive / t_tile:.1f}x ({rows} rows timed)"),
    ]


def bench_mc(quick: bool) -> list[tuple]:
    from skimage.measure import marching_cubes as sk_mc

    rows = []
    for res in (64, 128) if quick else (128, 256):
        p = grid_points(res)
        sdf = torch.minimum(p.norm(dim=-1) - 0.5, (p - 0.3).abs().amax(-1) - 0.35) + 0.02 * torch.sin(9 * p).prod(-1)
        s = sdf.clone().requires_grad_(True)
        t_torch = _timed(lambda s=s: marching_cubes(s)[0].sum().backward(), 3)
        t_fwd = _timed(lambda s=s: marching_cubes(s), 3)
        arr = sdf.numpy()
        t_sk = _timed(lambda arr=arr: sk_mc(arr, 0.0), 3)
        v, _ = marching_cubes(sdf)
        vs = torch.from_numpy(sk_mc(arr, 0.0, spacing=(2 / (res - 1),) * 3)[0].copy()).float() - 1
        # Match vertices by nearest neighbour (exact distances, no matmul trick).
        err = max(torch.cdist(v[i : i + 4096], vs, compute_mode="donot_use_mm_for_euclid_dist").min(1).values.max().item() for i in range(0, v.shape[0], 4096))
        rows.append((f"marching cubes {res}³ fwd", f"{v.shape[0]} verts", f"{t_fwd:.3f} s", f"skimage {t_sk:.3f} s: {t_fwd / t_sk:.2f}x, verts {v.shape[0]} vs {vs.shape[0]}, max diff {err:.1e}"))
        rows.append((f"marching cubes {res}³ fwd+bwd", f"{v.shape[0]} verts", f"{t_torch:.3f} s", f"vs skimage fwd: {t_torch / t_sk:.2f}x"))
    return rows


def bench_mesh(quick: bool) -> list[tuple]:
    res = 64 if quick else 160
    v, f = marching_cubes(grid_points(res).norm(dim=-1) - 0.7)
    size = 128 if quick else 256
    cams = orbit_cameras(torch.tensor([30.0]), torch.tensor([20.0]), 2.5, 40, size, size).reshape(1, 1)
    x = v[None].clone().requires_grad_(True)
    r = TorchMeshRasterizer(sigma=0.5)

    def run():
        fr = r(x, f, cams)
        (fr.depth.sum() + fr.soft_mask.sum()).backward()

    t = _timed(run)
    r_hard = TorchMeshRasterizer()
    t_hard = _timed(lambda: r_hard(x, f, cams).depth.sum().backward())
    return [
        ("mesh raster (soft sil.) fwd+bwd", f"{f.shape[0]} faces, {size}²", f"{t:.2f} s", f"hard-only {t_hard:.2f} s ({t / t_hard:.1f}x)"),
    ]


def bench_volume(quick: bool) -> list[tuple]:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))

    def field(p):
        h = mlp(p)
        return {"sdf": p.norm(dim=-1) - 0.5 + 0.01 * h[..., 0], "rgb": torch.sigmoid(h[..., 1:])}

    n_rays = 1024 if quick else 4096
    o = torch.tensor([0.0, 0.0, -3.0]).expand(1, n_rays, 3)
    d = torch.nn.functional.normalize(torch.randn(1, n_rays, 3) * 0.1 + torch.tensor([0.0, 0, 1]), dim=-1)
    vr = VolumeRenderer(n_samples=256, sdf_to_alpha=LaplaceDensity(0.01), perturb=True)

    def run():
        out = vr.render_rays(field, o, d)
        out.rgb.sum().backward()

    t = _timed(run)
    with torch.no_grad():
        t_field = _timed(lambda: field(torch.randn(1, n_rays * 256, 3)))
    return [("volume render 256 samples/ray fwd+bwd", f"{n_rays} rays", f"{n_rays / t:.0f} rays/s", f"MLP eval alone fwd {t_field:.2f} s = {t_field / t:.0%} of the render")]


def main(quick: bool = False) -> None:
    torch.manual_seed(0)
    rows = []
    for fn in (bench_gaussians, bench_mc, bench_mesh, bench_volume):
        rows += fn(quick)
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, quick={quick}, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    main(ap.parse_args().quick)
