"""Benchmark: rectified-flow Euler sampler overhead per step vs one model evaluation.

Run: ``.venv/bin/python benchmarks/bench_flow.py [--quick] [--threads 2] [--device cuda]``.

The sampler's own work per step (time grid, CFG combination, guidance rescale with per-object
std, multi-condition averaging, SparseVoxels wrapping and checks, the hook's state, the Euler
update) is measured with a *null* model (returns its input: its own cost is timed and
subtracted) and put next to one evaluation of a small real model, in the same run:

* dense: a DiT-ish model on TRELLIS's sparse-structure latent layout ``(B, 8, R, R, R)`` (R = 16,
  4096 tokens; 8 in ``--quick``), width 128, 2 pre-norm transformer blocks, additive timestep
  embedding;
* sparse: a per-voxel MLP (8 -> 256 -> 256 -> 8, timestep embedding per object) on
  ``SparseVoxels`` of B = 2 objects with 16k voxels each (4k in ``--quick``), the SLAT layout.

Per configuration it prints the model evaluations per step, the sampler overhead per step
(seconds, null model), one model evaluation, and their ratio (overhead / one evaluation). The last
column (one 2-step run with the real model) is a sanity check only.

Measured (full sizes, ``python -m benchmarks.run_all -k bench_flow``, 2 threads, load ~5 on the
2-core machine): dense, one evaluation 1.31 s, overhead 0.1 ms (plain) .. 3.4 ms (CFG + rescale +
hook), ratio <= 0.003; sparse, one evaluation 141 ms, overhead 1.0 ms (plain) .. 8.7 ms (CFG +
rescale + hook: every hook state is a checked SparseVoxels), ratio 0.007 .. 0.062.
Without ``OMP_WAIT_POLICY=PASSIVE`` on an oversubscribed CPU the small element-wise ops stall
(measured: the null model 14 ms instead of 20 us), so it is set here unless given.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (see above)

import argparse  # noqa: E402
import copy  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402


def _timestep_embedding(tt: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=tt.device, dtype=torch.float32) / half)
    args = tt[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


class TinyDiT(nn.Module):
    """``(B, C, R, R, R)`` -> same shape: patch-1 tokens, 2 transformer blocks, condition tokens
    prepended (cross-attention-free, to stay small), additive timestep embedding."""

    def __init__(self, channels: int = 8, width: int = 128, blocks: int = 2, cond_dim: int = 32):
        super().__init__()
        self.inp, self.out = nn.Linear(channels, width), nn.Linear(width, channels)
        self.t_mlp = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width))
        self.cond = nn.Linear(cond_dim, width)
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)

    def forward(self, x, tt, cond):
        B, C = x.shape[:2]
        tok = self.inp(x.flatten(2).transpose(1, 2)) + self.t_mlp(_timestep_embedding(tt, 64))[:, None]
        ctx = self.cond(cond)
        h = self.blocks(torch.cat([ctx, tok], 1))[:, ctx.shape[1]:]
        return self.out(h).transpose(1, 2).reshape(x.shape)


class VoxelMLP(nn.Module):
    """SparseVoxels -> SparseVoxels: per-voxel MLP with a per-object timestep and condition vector."""

    def __init__(self, channels: int = 8, width: int = 256, cond_dim: int = 32):
        super().__init__()
        self.inp = nn.Linear(channels, width)
        self.emb = nn.Linear(64 + cond_dim, width)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, channels))

    def forward(self, x, tt, cond):
        b = x.coords[:, 0].long()
        e = self.emb(torch.cat([_timestep_embedding(tt, 64), cond.mean(1)], -1))
        return x.replace(feats=self.mlp(self.inp(x.feats) + e[b]))


def _null(x, tt, cond):
    return x.replace(feats=x.feats.clone()) if hasattr(x, "coords") else x.clone()


def _best(fn, repeats: int, sync) -> float:
    fn()
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _configs():
    from recon3d.models.flow import FlowEulerSampler

    hook = lambda step: None  # noqa: E731 - builds the FlowStep (wrapping + x0), changes nothing
    return [
        ("plain", FlowEulerSampler(steps=8, rescale_t=3.0), {}, 1),
        ("cfg", FlowEulerSampler(steps=8, rescale_t=3.0, cfg_strength=3.0), {}, 2),
        ("cfg+rescale", FlowEulerSampler(steps=8, rescale_t=3.0, cfg_strength=3.0, guidance_rescale=0.7), {}, 2),
        ("multidiff V=3 +cfg", FlowEulerSampler(steps=8, rescale_t=3.0, cfg_strength=3.0, multi_condition="multidiffusion"), {"views": 3}, 4),
        ("cfg+rescale+hook", FlowEulerSampler(steps=8, rescale_t=3.0, cfg_strength=3.0, guidance_rescale=0.7), {"hook": hook}, 2),
    ]


def bench_case(name: str, model: nn.Module, noise, cond, device: str, repeats: int) -> list[dict]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    B = noise.batch_size if hasattr(noise, "coords") else noise.shape[0]
    tt = torch.full((B,), 500.0, device=device)
    rows = []
    with torch.no_grad():
        t_model = _best(lambda: model(noise, tt, cond), max(3, repeats // 2), sync)
        t_null = _best(lambda: _null(noise, tt, cond), repeats, sync)
    print(f"\n({name}) one model evaluation {t_model * 1e3:.2f} ms, null model {t_null * 1e6:.1f} us; "
          f"device {device}, threads {torch.get_num_threads()}")
    print(f"  {'config':<20} {'evals/step':>10} {'overhead/step':>14} {'model eval':>11} {'ratio':>8}   (full step, real model)")
    for label, sampler, extra, evals in _configs():
        c = [cond] * extra["views"] if "views" in extra else cond
        hook = extra.get("hook")
        per_step_null = _best(functools.partial(sampler.sample, _null, noise, c, hook=hook), repeats, sync) / sampler.steps
        overhead = max(per_step_null - evals * t_null, 0.0)
        # The full step with the real model: 2 steps once (the model is warm), only a sanity
        # column -- its noise is that of the model's own time.
        short = copy.copy(sampler)
        short.steps = 2
        t0 = time.perf_counter()
        short.sample(model, noise, c, hook=hook)
        sync()
        per_step_real = (time.perf_counter() - t0) / short.steps
        rows.append({"config": label, "evals": evals, "overhead": overhead, "model": t_model, "ratio": overhead / t_model,
                     "step_real": per_step_real})
        print(f"  {label:<20} {evals:>10} {overhead * 1e3:>11.3f} ms {t_model * 1e3:>8.2f} ms {overhead / t_model:>8.3f}"
              f"   ({per_step_real * 1e3:.2f} ms = {per_step_real / t_model:.2f} evals)")
    return rows


def main(quick: bool = False, device: str = "cpu") -> list[dict]:
    """Run both cases and print the ratios measured in this run."""
    from recon3d.representations.voxels import SparseVoxels

    torch.manual_seed(0)
    repeats = 5 if quick else 9
    R = 8 if quick else 16
    dit = TinyDiT().to(device).eval()
    dense = torch.randn(2, 8, R, R, R, device=device)
    cond = torch.randn(2, 16, 32, device=device)
    rows = bench_case(f"dense DiT-ish, latent 2x8x{R}^3, {R ** 3} tokens", dit, dense, cond, device, repeats)

    n = 4096 if quick else 16384
    g = torch.Generator().manual_seed(0)
    coords = []
    for b in range(2):  # distinct voxels of a 64^3 grid per object
        flat = torch.randperm(64 ** 3, generator=g)[:n].sort().values
        xyz = torch.stack([flat // 4096, (flat // 64) % 64, flat % 64], 1)
        coords.append(torch.cat([torch.full((n, 1), b), xyz], 1))
    sv = SparseVoxels(torch.cat(coords).to(device), torch.randn(2 * n, 8, device=device), 64, 2)
    rows += bench_case(f"sparse MLP, SparseVoxels 2 x {n} voxels x 8", VoxelMLP().to(device).eval(), sv, cond, device, repeats)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    main(a.quick, a.device)
