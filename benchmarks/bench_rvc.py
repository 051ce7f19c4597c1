"""Benchmark: the sampling time rendering-aware velocity compensation (RVC) adds, as a ratio to plain sampling.

Run: ``.venv/bin/python benchmarks/bench_rvc.py [--quick] [--threads 2]``.

Setup (also the tests' toy, ``tests/models/reconviagen``): the latent is one colour-logit triple
per Gaussian on a fixed ``n^3`` grid in [-0.5, 0.5]^3 (:class:`ColourDecoder` turns x̂0 into
:class:`~recon3d.representations.Gaussians`), the input views are renders of a true latent at
orbit cameras, and the flow is either the exact velocity of a Gaussian data distribution centred
on wrong colours (:class:`GaussianDataFlow`, no network cost: the tests) or, for the timing, a
small per-token transformer (:class:`TokenFlow`, width 128, 2 blocks over the ``n^3`` tokens) so
that plain sampling has a network cost to compare with. Rendering: recon3d's pure-torch Gaussian
rasteriser (CPU). Sampler: 12 steps, rescale_t 3 (the SLAT stage's grid), no guidance.

Rows: plain sampling; RVC paper mode (one decode + render + backward per step with t < 0.5);
RVC official mode (5 Adam steps, i.e. 5 decode + render + backward per step with t <= 0.5, the
official cost); seconds per run (median of ``repeats``), the added time as a ratio to plain
sampling, the number of RVC steps, and the seconds per RVC render+backward. The ratio depends
on the ratio of network cost to render cost, so it only says something for this network and
image size: at TRELLIS scale (a 1B-parameter SLAT flow on GPU, 259² gsplat renders of ~10^5
Gaussians) both sides change.

Measured once (full sizes: 216 Gaussians, 4 views of 64², ``--threads 2`` on the shared 2-core
machine, L1 + (1 - SSIM) only: no LPIPS/DreamSim weights here)::

    mode          s/run  added/plain  rvc steps  renders  s/render+bwd
    plain         0.057         0.00          0        0             -
    paper         2.408        41.03          2        2        1.1756
    official     30.155       525.27          3       15        2.0065

So on CPU the added time is all rendering: one decode + pure-torch rasterisation + backward of 4
views costs ~1-2 s, about 250 evaluations of this small network (4.7 ms each); the official mode
renders 5x per RVC step and acts on one more step (``t <= 0.5`` includes the grid's t = 0.5), so
it costs ~12x the paper mode. The grid (12 steps, rescale_t 3) has only 2-3 steps below 0.5.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (see bench_flow)

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

SIGMA_MIN = 1e-5


# ---------------------------------------------------------------------------------- the toy
def grid_means(n: int = 3) -> torch.Tensor:
    """``(n^3, 3)`` centres on a grid in [-0.5, 0.5]^3."""
    a = torch.linspace(-0.5, 0.5, n)
    return torch.stack(torch.meshgrid(a, a, a, indexing="ij"), -1).reshape(-1, 3)


class ColourDecoder:
    """Latent ``(B, N, 3)`` colour logits -> Gaussians (opacity 0.95, isotropic ``scale``) at fixed grid centres."""

    def __init__(self, n: int = 3, scale: float | None = None):
        self.means = grid_means(n)
        self.scale = 0.48 / max(n - 1, 1) if scale is None else scale

    @property
    def size(self) -> int:
        return self.means.shape[0]

    def __call__(self, x0: torch.Tensor):
        from recon3d.representations import Gaussians

        B, N = x0.shape[:2]
        means = self.means.to(x0)[None].expand(B, N, 3)
        quats = torch.zeros(B, N, 4, dtype=x0.dtype, device=x0.device)
        quats[..., 0] = 1
        scales = torch.full((B, N, 3), self.scale, dtype=x0.dtype, device=x0.device)
        return Gaussians(means, quats, scales, torch.full((B, N), 0.95, dtype=x0.dtype, device=x0.device), torch.sigmoid(x0))


class GaussianDataFlow:
    """The exact rectified-flow velocity of data ``x0 ~ N(mu, tau^2 I)`` (TRELLIS's convention):
    ``x_t = (1 - t) x0 + s(t) eps``, ``E[x0 | x_t] = mu + a tau^2 / (a^2 tau^2 + s^2) (x_t - a mu)``
    with ``a = 1 - t``, and ``v = ((1 - sigma_min) x_t - E[x0 | x_t]) / s``."""

    def __init__(self, mu: torch.Tensor, tau: float = 0.7):
        self.mu, self.tau = mu, tau

    def __call__(self, x, tt, cond=None):
        t = (tt.float() / 1000.0).view(-1, *([1] * (x.ndim - 1))).to(x)
        a, s = 1 - t, SIGMA_MIN + (1 - SIGMA_MIN) * t
        mu = self.mu.to(x)
        ex0 = mu + a * self.tau**2 / (a**2 * self.tau**2 + s**2) * (x - a * mu)
        return ((1 - SIGMA_MIN) * x - ex0) / s


class TokenFlow(nn.Module):
    """A small velocity network over the ``N`` latent tokens: linear in, timestep embedding added,
    ``blocks`` pre-norm transformer layers, linear out (random weights: only its cost matters)."""

    def __init__(self, channels: int = 3, width: int = 128, blocks: int = 2):
        super().__init__()
        self.inp, self.out = nn.Linear(channels, width), nn.Linear(width, channels)
        self.t = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)

    def forward(self, x, tt, cond=None):
        half = 32
        f = torch.exp(-math.log(10000.0) * torch.arange(half, device=x.device) / half)
        emb = torch.cat([torch.cos(tt[:, None] * f), torch.sin(tt[:, None] * f)], -1)
        return self.out(self.blocks(self.inp(x) + self.t(emb)[:, None]))


def setup(views: int = 4, size: int = 32, n: int = 3, seed: int = 0, bias: float = 1.5):
    """``(decoder, true latent (1, N, 3), wrong mean (1, N, 3), cameras (1, V), images (1, V, 3, H, W))``:
    the true colours ``2 N(0, 1)``, the flow's mean off by ``±bias`` per element, black background."""
    from recon3d.data.cameras import orbit_cameras
    from recon3d.render.gaussians import GaussianRasterizer

    g = torch.Generator().manual_seed(seed)
    dec = ColourDecoder(n)
    z = 2.0 * torch.randn(1, dec.size, 3, generator=g)
    mu = z + bias * torch.sign(torch.randn(1, dec.size, 3, generator=g))
    az = torch.arange(views) * (360.0 / views) + 20.0
    cams = orbit_cameras(az, torch.full((views,), 25.0), 2.6, 40.0, size, size)[None]
    with torch.no_grad():
        images = GaussianRasterizer("torch", background="black")(dec(z), cams).rgb
    return dec, z, mu, cams, images


def turned(cams, view: int, degrees: float = 180.0):
    """A copy of ``cams (1, V)`` with camera ``view`` turned about its own y axis by ``degrees``
    (a planted wrong camera: at 180° it looks away from the object)."""
    from recon3d.data.cameras import Cameras

    c2w = cams.c2w.clone()
    a = math.radians(degrees)
    R = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    c2w[0, view, :3, :3] = c2w[0, view, :3, :3] @ R
    return Cameras(c2w, cams.K.clone(), cams.width, cams.height)


# ---------------------------------------------------------------------------------- timing
def _median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(quick: bool = False, repeats: int | None = None) -> list[dict]:
    """Time plain sampling and both RVC modes on the toy; print and return the rows."""
    from recon3d.models.flow import FlowEulerSampler
    from recon3d.models.reconviagen import RenderingLoss, VelocityCompensation

    torch.manual_seed(0)
    size, views, n = (32, 2, 3) if quick else (64, 4, 6)
    repeats = repeats or (1 if quick else 3)
    dec, z, mu, cams, images = setup(views, size, n)
    net = TokenFlow().eval()
    sampler = FlowEulerSampler(steps=12, rescale_t=3.0)
    noise = sampler.noise_like(z, [torch.Generator().manual_seed(1)])
    # LPIPS / DreamSim left out (no weights here): L1 + (1 - SSIM) only, stated in the rows.
    loss = lambda preset: RenderingLoss(preset, weights={"lpips": 0, "dreamsim": 0})  # noqa: E731
    t_plain, _ = _median_time(lambda: sampler.sample(net, noise), repeats)
    print(f"toy: {dec.size} Gaussians, {views} views of {size}^2, TokenFlow width 128 x 2 blocks, 12 steps rescale_t 3; "
          "loss without LPIPS/DreamSim (no weights)")
    print(f"  {'mode':<10} {'s/run':>8} {'added/plain':>12} {'rvc steps':>10} {'renders':>8} {'s/render+bwd':>13}")
    print(f"  {'plain':<10} {t_plain:>8.3f} {0.0:>12.2f} {0:>10} {0:>8} {'-':>13}")
    rows = [{"mode": "plain", "seconds": t_plain, "ratio": 0.0}]
    for mode in ("paper", "official"):
        hooks = []

        def run(mode=mode, hooks=hooks):
            h = VelocityCompensation(dec, images, cams, loss=loss(mode), mode=mode, render_opts={"backend": "torch"})
            hooks.append(h)
            return sampler.sample(net, noise, hook=h)

        t, _ = _median_time(run, repeats)
        h = hooks[-1]
        n_steps = sum(r["applied"] for r in h.history)
        renders = sum(r.get("adam_steps", 1) for r in h.history if r["applied"])
        per = (t - t_plain) / max(renders, 1)
        ratio = (t - t_plain) / t_plain
        rows.append({"mode": mode, "seconds": t, "ratio": ratio, "rvc_steps": n_steps, "renders": renders, "per_render": per})
        print(f"  {mode:<10} {t:>8.3f} {ratio:>12.2f} {n_steps:>10} {renders:>8} {per:>13.4f}")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, one repeat")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    main(a.quick)
