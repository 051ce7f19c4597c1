"""LGM benchmarks (issue 15), CPU; every figure has a ratio against a reference measured in the same run.

(a) ``big`` network forward, 4 x 256² input -> 4 x 128² = 65,536 Gaussians (random weights, no
    grad): wall time, peak RSS, model FLOPs (``recon3d.models.flops.flop_counter`` on the meta
    device: the count needs no arithmetic), achieved FLOP/s and its ratio to this machine's fp32
    matmul throughput measured in the same run (a CPU "MFU").
(b) rasterisation of 65,536 Gaussians in the ``big`` layout (4 views x 128² splat pixels) into the
    4 LGM input views at 256² (LGM's fovy 49.1°, near 0.5, far 2.5, white background), through the
    renderer layer's pure-torch tile rasteriser: forward and forward + backward (training) time and
    peak RSS, against a dense per-pixel compositor of the same work (every pixel against every
    Gaussian, :func:`benchmarks.bench_render.naive_composite`) timed on a band of rows and
    extrapolated, plus the two renders' largest difference on that band. The Gaussians are
    *pixel-aligned* the way a trained LGM's are: splat pixel ``(v, i, j)``'s Gaussian sits where
    its ray meets a sphere of radius 0.5 (else it is transparent), with the pixel's footprint as
    its scale. A random-weight network's own output is not used for this: its Gaussians are
    ~7x wider (``0.1 · softplus(≈0) ≈ 0.07``), which measures a scene no trained LGM produces
    (every Gaussian covering ~5,000 pixels) -- the docstring of :func:`pixel_aligned_gaussians`.
(c) the ``tiny`` CPU network (``configs/lgm_cpu.yaml``'s: 4 x 32² -> 1,024 Gaussians): forward +
    render of 4 views at 32² (inference), and a training step's forward + render + backward; the
    share of the time in the rasteriser and the forward's MFU are the ratios.
(d) LGM (tiny) vs LGM + LoRA boost after the same number of extra steps on the synthetic set:
    train ``configs/lgm_cpu.yaml``'s LGM ``steps`` steps; then continue (i) plain LGM (every
    weight, LGM's optimiser and one-cycle schedule, restarted) or (ii) :class:`BoostModule` (LoRA
    on the cross-view attention, base frozen) for ``extra`` steps on the same data in the same
    order; evaluate the base and both continuations on the same held-out objects with the config's
    ``EvaluationProtocol`` (PSNR, SSIM, mask IoU; Chamfer, F-score on the Gaussian centres, the
    ``gtr`` geometry preset). Both branches use lr 1e-3 (the CPU config's); plain LGM its one-cycle
    schedule (40 warm-up steps), the boost AdamW with ``extra // 10`` warm-up steps and cosine decay;
    LoRA rank 8, alpha 8 on the tiny U-Net's ``MVAttention`` qkv/proj (BoostModule's LGM default
    pattern). The supervision views are the synthetic set's true renders, the same data the base
    saw -- not MVBoost's pseudo-ground-truth, which is the next issue -- so boosting gets no
    information the plain continuation lacks, and has far fewer trainable weights: the table
    says what a few LoRA steps cost or buy, not what the paper's boosting on new data buys.

    python -m benchmarks.bench_lgm [--quick] [--no-big] [--steps N] [--extra M]

(a) also renders the random-weight forward's own 65,536 Gaussians into its 4 input views (the
literal "forward + rasterisation"), once, forward only: those Gaussians are ~7x wider than a
trained LGM's, so this row is a worst case of the rasteriser, not its typical cost.

Peak memory is the process's resident-set high-water mark (``VmHWM``), reset just before the
measured call (``/proc/self/clear_refs``), minus nothing: the figure printed next to it is the
resident set before the call (weights, runtime), so the difference is what the call added. Where
the reset is not available (not Linux) the process-lifetime peak (``ru_maxrss``) is printed and
says so.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_render's docstring

import argparse  # noqa: E402
import copy  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LGM_CPU_CONFIG = ROOT / "configs/lgm_cpu.yaml"


# ---------------------------------------------------------------------- measuring
def _status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's resident-set high-water mark of this process (Linux: ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


def _rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return float("nan") if kb is None else kb / 1024


@dataclass
class Measured:
    """Best wall time of the timed calls and the resident-set peak during them (MB)."""

    seconds: float
    peak_mb: float
    before_mb: float
    peak_kind: str  # "call" (high-water mark reset before the call) or "process" (lifetime peak)

    def memory(self) -> str:
        if self.peak_kind == "call":
            return f"peak RSS {self.peak_mb:.0f} MB (+{self.peak_mb - self.before_mb:.0f} over {self.before_mb:.0f} MB before)"
        return f"process peak RSS {self.peak_mb:.0f} MB (high-water mark not resettable here; {self.before_mb:.0f} MB before)"


def measure(fn, repeat: int = 1, warmup: int = 1) -> Measured:
    """Run ``fn`` ``warmup`` times untimed, then ``repeat`` times timed; best time and the peak RSS of the timed calls."""
    for _ in range(warmup):
        fn()
    before = _rss_mb()
    kind = "call" if _reset_peak() else "process"
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    peak = (_status_kb("VmHWM") or 0) / 1024 if kind == "call" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return Measured(best, peak, before, kind)


def _load() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


# ---------------------------------------------------------------------- (a) forward
def forward_flops(preset: str, size: int, views: int = 4) -> int:
    """Model FLOPs of one ``LGMNetwork(preset)`` forward on ``views x size²`` inputs (batch 1).

    Counted on the meta device (shapes only, no arithmetic: the ``big`` count takes seconds
    instead of a minute); convolutions and matmuls as torch's ``FlopCounterMode`` counts them,
    attention by :mod:`recon3d.models.flops`' formulas, element-wise ops not at all.
    """
    from recon3d.models.flops import flop_counter
    from recon3d.models.lgm import LGMNetwork, lgm_input_features, lgm_orbit_cameras

    cams = lgm_orbit_cameras(torch.arange(views) * 360.0 / views, size=size)[None]
    feats = lgm_input_features(torch.rand(1, views, 3, size, size), cams).to("meta")
    with torch.device("meta"):
        net = LGMNetwork(preset, num_views=views)
    with torch.no_grad(), flop_counter() as fc:
        net.raw_from_features(feats)
    return int(fc.get_total_flops())


def bench_forward(preset: str = "big", size: int | None = None, views: int = 4, repeat: int = 1, warmup: int = 0,
                  peak: float | None = None, seed: int = 0) -> dict:
    """Time and peak RSS of one no-grad ``LGMNetwork(preset)`` forward on ``(1, views, 3, size, size)``.

    Returns a dict with ``seconds``, ``measured`` (:class:`Measured`), ``flops``, ``gflops_per_s``,
    ``peak`` (fp32 matmul FLOP/s, measured now unless given), ``mfu``, ``gaussians``, ``params``.
    """
    from recon3d.models.flops import matmul_peak
    from recon3d.models.lgm import LGM_PRESETS, LGMNetwork, lgm_orbit_cameras

    size = size or LGM_PRESETS[preset]["input_size"]
    torch.manual_seed(seed)
    net = LGMNetwork(preset, num_views=views).eval()
    cams = lgm_orbit_cameras(torch.arange(views) * 360.0 / views, size=size)[None]
    images = torch.rand(1, views, 3, size, size, generator=torch.Generator().manual_seed(seed))
    out = {}

    def run():
        with torch.no_grad():
            out["g"] = net(images, cams)

    m = measure(run, repeat=repeat, warmup=warmup)
    flops = forward_flops(preset, size, views)
    peak = matmul_peak() if peak is None else peak
    return dict(seconds=m.seconds, measured=m, flops=flops, gflops_per_s=flops / m.seconds / 1e9, peak=peak,
                mfu=flops / m.seconds / peak, gaussians=int(out["g"].num_gaussians),
                params=sum(p.numel() for p in net.parameters()), gaussians_out=out["g"])


# ---------------------------------------------------------------------- (b) rasteriser
def pixel_aligned_gaussians(cameras, splat: int, sphere_radius: float = 0.5, seed: int = 0):
    """Dense Gaussians ``(1, V·splat²)`` laid out like a trained LGM's output (view, row, column).

    Splat pixel ``(v, i, j)`` of input camera ``v`` (``cameras (1, V)`` resized to ``splat²``)
    gives one Gaussian: where its ray meets the sphere ``|x| = sphere_radius`` it sits at the hit,
    opaque (0.9), moved along the ray by U(-0.5, 0.5) footprints (no two depths tie), with scale =
    the pixel's footprint at that depth (x U(0.75, 1.5) per axis) and a random rotation and colour; a ray that misses gives a transparent Gaussian (opacity 1e-3, below
    the rasteriser's 1/255 alpha floor, so culled: a trained LGM makes its background Gaussians
    transparent too). A random-weight network instead predicts scales ``0.1 · softplus(≈0) ≈ 0.07``
    for every Gaussian, ~7x the footprint here.
    """
    from recon3d.data.rays import camera_rays
    from recon3d.representations import Gaussians

    g = torch.Generator().manual_seed(seed)
    cams = cameras.resized(splat, splat)
    o, d = camera_rays(cams)  # (1, V, s, s, 3)
    o, d = o.reshape(1, -1, 3), d.reshape(1, -1, 3)
    b = (o * d).sum(-1)
    disc = b * b - ((o * o).sum(-1) - sphere_radius**2)
    hit = disc > 0
    t = torch.where(hit, -b - disc.clamp_min(0).sqrt(), -b)  # first hit, or the ray's closest approach to the origin
    fy = cams.K[0, 0, 1, 1]
    footprint = (t / fy)[..., None]  # world size of one splat pixel at distance t
    # Along-ray jitter of half a footprint: a sphere seen from symmetric views gives many exactly
    # equal depths, whose compositing order (hence colour) is then up to each sort's tie-breaking.
    t = t + footprint[..., 0] * (torch.rand(t.shape, generator=g) - 0.5)
    means = o + t[..., None] * d
    scales = footprint * (0.75 + 0.75 * torch.rand(*means.shape, generator=g))
    quats = torch.nn.functional.normalize(torch.randn(1, means.shape[1], 4, generator=g), dim=-1)
    opac = torch.where(hit, torch.full_like(t, 0.9), torch.full_like(t, 1e-3))
    colors = torch.rand(*means.shape, generator=g)
    return Gaussians(means, quats, scales, opac, colors)


def bench_raster(splat: int = 128, views: int = 4, size: int = 256, rows: int = 1, repeat: int = 1,
                 backward: bool = True, seed: int = 0) -> dict:
    """The pure-torch tile rasteriser on ``views·splat²`` pixel-aligned Gaussians into ``views x size²``.

    Returns ``fwd`` / ``fwd_bwd`` (:class:`Measured`), ``naive_s`` (the dense compositor's forward,
    extrapolated from ``rows`` rows per view), ``band_max_diff`` (largest |rgb| difference of the
    two on that band, black background), ``gaussians``, ``visible`` (fraction kept after culling).
    """
    from benchmarks.bench_render import naive_composite
    from recon3d.models.lgm import LGM_FAR, LGM_NEAR, lgm_orbit_cameras
    from recon3d.render import render
    from recon3d.render.gaussians import GaussianRasterizer
    from recon3d.representations import Gaussians

    cams = lgm_orbit_cameras(torch.arange(views) * 360.0 / views, size=size)[None]
    g = pixel_aligned_gaussians(cams, splat, seed=seed)
    raster = GaussianRasterizer("torch", background="white", near=LGM_NEAR, far=LGM_FAR)
    res = {"gaussians": g.num_gaussians, "visible": float((g.opacities >= 1 / 255).float().mean())}

    def fwd():
        with torch.no_grad():
            res["out"] = render(g, cams, "white", renderer=raster)

    res["fwd"] = measure(fwd, repeat=repeat)
    if backward:
        leaves = [t.clone().requires_grad_(True) for t in (g.means, g.quats, g.scales, g.opacities, g.colors)]
        gg = Gaussians(*leaves)

        def fwd_bwd():
            out = render(gg, cams, "white", renderer=raster)
            (out.rgb.sum() + out.alpha.sum()).backward()

        res["fwd_bwd"] = measure(fwd_bwd, repeat=repeat)
    # The dense compositor costs the same per pixel everywhere: time a band of rows, scale to the image.
    band = slice(size // 2, size // 2 + rows)
    ref = {}

    def naive():
        with torch.no_grad():
            ref["acc"] = naive_composite(g, cams, band)

    res["naive_s"] = measure(naive, warmup=0).seconds * size / rows
    with torch.no_grad():
        black = render(g, cams, "black", renderer=raster).rgb[0, :, :, band]  # (V, 3, rows, W)
    dense = ref["acc"][..., :3].reshape(views, rows, size, 3).permute(0, 3, 1, 2)
    res["band_max_diff"] = float((black - dense).abs().max())
    return res


# ---------------------------------------------------------------------- (c) tiny
def bench_tiny(size: int = 32, views: int = 4, repeat: int = 5, peak: float | None = None, seed: int = 0) -> dict:
    """``LGMNetwork("tiny")`` forward + render of ``views`` views at ``size²``, and a training step.

    Returns ``forward`` / ``render`` / ``forward_render`` / ``train_step`` (:class:`Measured`), the
    forward's ``flops`` and ``mfu``.
    """
    from recon3d.models.flops import matmul_peak
    from recon3d.models.lgm import LGM_FAR, LGM_NEAR, LGMNetwork, lgm_orbit_cameras
    from recon3d.render import render
    from recon3d.render.gaussians import GaussianRasterizer

    torch.manual_seed(seed)
    net = LGMNetwork("tiny", num_views=views)
    cams = lgm_orbit_cameras(torch.arange(views) * 360.0 / views, size=size)[None]
    images = torch.rand(1, views, 3, size, size, generator=torch.Generator().manual_seed(seed))
    raster = GaussianRasterizer("torch", background="white", near=LGM_NEAR, far=LGM_FAR)
    res = {}
    net.eval()
    with torch.no_grad():
        g = net(images, cams)
        res["forward"] = measure(lambda: net(images, cams), repeat=repeat)
        res["render"] = measure(lambda: render(g, cams, "white", renderer=raster), repeat=repeat)
        res["forward_render"] = measure(lambda: render(net(images, cams), cams, "white", renderer=raster), repeat=repeat)
    net.train()

    def step():
        net.zero_grad(set_to_none=True)
        out = render(net(images, cams), cams, "white", renderer=raster)
        torch.nn.functional.mse_loss(out.rgb, images).backward()

    res["train_step"] = measure(step, repeat=repeat)
    res["flops"] = forward_flops("tiny", size, views)
    peak = matmul_peak() if peak is None else peak
    res["peak"] = peak
    res["mfu"] = res["flops"] / res["forward"].seconds / peak
    return res


# ---------------------------------------------------------------------- (d) boost vs plain
def boost_available() -> str | None:
    """None when LGMModule and BoostModule import, else the reason (d) is skipped."""
    try:
        from recon3d.methods.boost import BoostModule  # noqa: F401
        from recon3d.methods.lgm import LGMModule  # noqa: F401
    except ImportError as e:
        return f"needs LGMModule/BoostModule ({e})"
    if not LGM_CPU_CONFIG.is_file():
        return f"needs LGMModule/BoostModule's CPU config {LGM_CPU_CONFIG.relative_to(ROOT)}"
    return None


def _lgm_cli(args: list[str], out_dir: Path):
    from recon3d.cli import run_lightning_cli

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Only the model and data are used; training and testing run on _trainer's plain Trainer.
        return run_lightning_cli(["-c", str(LGM_CPU_CONFIG), "--trainer.logger", "false",
                                  "--trainer.default_root_dir", str(out_dir), *args], run=False)


def _trainer(out_dir: Path, steps: int):
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, gradient_clip_val=1.0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(out_dir))


def _fit_test(model, dm, steps: int, out_dir: Path, seed: int) -> tuple[float, dict]:
    import lightning.pytorch as pl

    seconds = 0.0
    if steps > 0:
        pl.seed_everything(seed, verbose=False)  # the same data order and augmentation coins for every branch
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _trainer(out_dir, steps).fit(model, datamodule=dm)
        seconds = time.perf_counter() - t
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = _trainer(out_dir, 1).test(model, datamodule=dm, verbose=False)
    return seconds, {k.removeprefix("test/"): float(v) for k, v in (res[0] if res else {}).items()}


def bench_boost(steps: int = 150, extra: int = 75, num_objects: int = 16, num_test: int = 4, rank: int = 8,
                lr: float = 1e-3, seed: int = 0, out_dir: Path | None = None) -> dict | str:
    """(d): LGM tiny ``steps`` steps, then ``extra`` more as plain LGM or as LoRA boost; held-out metrics.

    Returns ``{"base": (train s, metrics), "lgm": ..., "boost": ..., "adapter_params": n,
    "params": n, "base_bit_identical": bool}`` or, when the modules are not there, the skip reason
    (a string). ``out_dir``: where the runs write their test folders (None: a temporary folder,
    removed).
    """
    reason = boost_available()
    if reason:
        return reason
    import logging
    import tempfile

    from recon3d.methods.boost import BoostModule

    for name in ("lightning.pytorch", "lightning.fabric"):  # device banners and tips, once per Trainer
        logging.getLogger(name).setLevel(logging.WARNING)

    if out_dir is None:  # the runs' test folders (metrics, image grids) are not kept
        with tempfile.TemporaryDirectory(prefix="bench_lgm_") as tmp:
            return bench_boost(steps, extra, num_objects, num_test, rank, lr, seed, Path(tmp))
    tmp = Path(out_dir)
    data = ["--data.dataset.init_args.num_objects", str(num_objects), "--data.num_val_objects", "0",
            "--data.num_test_objects", str(num_test)]
    cli = _lgm_cli(data + ["--seed_everything", str(seed), "--model.init_args.lr", str(lr)], tmp)
    base, dm = cli.model, cli.datamodule
    out = {"params": sum(p.numel() for p in base.parameters())}
    t = time.perf_counter()
    dm.prepare_data()  # the synthetic set is generated once, here, outside the training times
    out["data_s"] = time.perf_counter() - t
    out["base"] = _fit_test(base, dm, steps, tmp / "base", seed)
    state = copy.deepcopy(base.state_dict())

    plain = _lgm_cli(data + ["--seed_everything", str(seed), "--model.init_args.lr", str(lr)], tmp).model
    plain.load_state_dict(state)
    out["lgm"] = _fit_test(plain, dm, extra, tmp / "lgm", seed + 1)

    boost_base = _lgm_cli(data + ["--seed_everything", str(seed)], tmp).model
    boost_base.load_state_dict(state)
    boosted = BoostModule(base=boost_base, rank=rank, alpha=float(rank), lr=lr, warmup_steps=max(1, extra // 10),
                          evaluation=boost_base.evaluation, adapter_file=None)
    out["adapter_params"] = sum(p.numel() for p in boosted.parameters() if p.requires_grad)
    frozen = {k: v.clone() for k, v in boosted.base_state_dict().items()}
    out["boost"] = _fit_test(boosted, dm, extra, tmp / "boost", seed + 1)
    after = boosted.base_state_dict()
    out["base_bit_identical"] = all(torch.equal(frozen[k], after[k]) for k in frozen)
    return out


# ---------------------------------------------------------------------- report
def _print_forward(r: dict, label: str) -> None:
    m = r["measured"]
    print(f"(a) {label} forward (no grad), {r['params'] / 1e6:.1f} M params -> {r['gaussians']:,} Gaussians: "
          f"{m.seconds:.2f} s, {m.memory()}; {r['flops'] / 1e9:.1f} GFLOP, {r['gflops_per_s']:.1f} GFLOP/s achieved, "
          f"fp32 matmul peak {r['peak'] / 1e9:.1f} GFLOP/s, ratio (CPU MFU) {r['mfu']:.3f}")
    g = r["gaussians_out"]
    print(f"    its random-weight Gaussians: scale median {float(g.scales.median()):.3f}, opacity mean "
          f"{float(g.opacities.mean()):.2f} (not a trained LGM's scene; (b) renders a pixel-aligned one)")


def _print_own_render(fw: dict) -> None:
    """The forward's own random-weight Gaussians rendered into its 4 input views (one call, no grad)."""
    from recon3d.models.lgm import LGM_FAR, LGM_NEAR, lgm_orbit_cameras
    from recon3d.render import render
    from recon3d.render.gaussians import GaussianRasterizer

    g = fw.pop("gaussians_out")
    cams = lgm_orbit_cameras(size=256)[None]
    raster = GaussianRasterizer("torch", background="white", near=LGM_NEAR, far=LGM_FAR)

    def run():
        with torch.no_grad():
            render(g, cams, "white", renderer=raster)

    m = measure(run, warmup=0)
    total = fw["seconds"] + m.seconds
    print(f"(a) + rasterise those {g.num_gaussians:,} random-weight Gaussians into the 4 input views at 256²: {m.seconds:.1f} s, "
          f"{m.memory()}; forward + rasterisation {total:.1f} s (rasteriser {m.seconds / total:.0%})")


def _print_raster(r: dict, label: str) -> None:
    print(f"(b) rasterise {label}: {r['gaussians']:,} Gaussians ({r['visible']:.0%} opaque, rest culled)")
    print(f"    forward          {r['fwd'].seconds:7.2f} s, {r['fwd'].memory()}")
    if "fwd_bwd" in r:
        print(f"    forward+backward {r['fwd_bwd'].seconds:7.2f} s, {r['fwd_bwd'].memory()}")
    print(f"    dense per-pixel compositor forward (extrapolated) {r['naive_s']:.1f} s: tiles {r['naive_s'] / r['fwd'].seconds:.1f}x "
          f"faster; max |rgb| difference on the timed band {r['band_max_diff']:.1e}")


def _print_tiny(r: dict, label: str) -> None:
    fr = r["forward_render"].seconds
    print(f"(c) tiny {label}: forward {r['forward'].seconds * 1e3:.0f} ms, render {r['render'].seconds * 1e3:.0f} ms, "
          f"forward+render {fr * 1e3:.0f} ms (render {r['render'].seconds / fr:.0%} of it), "
          f"training step (fwd+render+bwd) {r['train_step'].seconds * 1e3:.0f} ms ({r['train_step'].memory()}); "
          f"forward {r['flops'] / 1e9:.2f} GFLOP, MFU {r['mfu']:.3f}")


def _print_boost(r: dict | str, steps: int, extra: int) -> None:
    if isinstance(r, str):
        print(f"(d) LGM vs LGM + boost: skipped: {r}")
        return
    print(f"(d) LGM tiny ({r['params']:,} params) {steps} steps, then {extra} extra steps as plain LGM "
          f"(all weights) or LoRA boost ({r['adapter_params']:,} adapter params, base bit-identical: {r['base_bit_identical']}); "
          f"held-out objects, supervision = the synthetic set's true renders (generated in {r['data_s']:.0f} s)")
    keys = [k for k in ("psnr", "ssim", "mask_iou", "cd", "fscore") if any(k in r[n][1] for n in ("base", "lgm", "boost"))]
    print(f"    {'model':<22} {'train s':>8} " + " ".join(f"{k:>9}" for k in keys))
    for name, label in (("base", f"LGM @ {steps}"), ("lgm", f"LGM @ {steps}+{extra}"), ("boost", f"LGM+boost @ {steps}+{extra}")):
        secs, m = r[name]
        print(f"    {label:<22} {secs:>8.1f} " + " ".join(f"{m.get(k, math.nan):>9.4f}" for k in keys))


def main(quick: bool = False, big: bool | None = None, steps: int | None = None, extra: int | None = None) -> None:
    """All four parts; ``quick``: no ``big`` forward (a minute on 2 cores), a 4 x 64² splat at 128²,
    and a short (d). ``big`` overrides whether (a) runs."""
    from recon3d.models.flops import matmul_peak

    big = (not quick) if big is None else big
    steps = steps if steps is not None else (20 if quick else 150)
    extra = extra if extra is not None else (10 if quick else 75)
    torch.manual_seed(0)
    print(f"bench_lgm: torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, quick={quick}, {_load()}")
    peak = matmul_peak()
    if big:
        fw = bench_forward("big", 256, peak=peak)
        _print_forward(fw, "big 4x256²")
        _print_own_render(fw)
    else:
        print("(a) big forward: skipped (quick; about a minute on 2 cores: python -m benchmarks.bench_lgm)")
    splat, size = (64, 128) if quick else (128, 256)
    _print_raster(bench_raster(splat, 4, size), f"4 x {splat}² splat -> 4 x {size}²")
    _print_tiny(bench_tiny(peak=peak), "4 x 32² -> 1,024 Gaussians, render 4 x 32²")
    _print_boost(bench_boost(steps, extra, num_objects=8 if quick else 16), steps, extra)
    print(f"bench_lgm done ({_load()})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="no big forward, smaller raster, short (d)")
    ap.add_argument("--no-big", action="store_true", help="skip the big forward (a)")
    ap.add_argument("--steps", type=int, default=None, help="(d): LGM steps before the branches (default 150; quick 20)")
    ap.add_argument("--extra", type=int, default=None, help="(d): extra steps of each branch (default 75; quick 10)")
    a = ap.parse_args()
    import sys

    sys.path.insert(0, str(ROOT))  # `python benchmarks/bench_lgm.py`: the benchmarks package (bench_render's compositor)
    main(a.quick, False if a.no_big else None, a.steps, a.extra)
