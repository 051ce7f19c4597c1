"""Benchmark: TRELLIS's two flows' step time vs token count on CPU, and a tiny end-to-end sample split by stage.

Run: ``.venv/bin/python benchmarks/bench_trellis.py [--quick] [--threads 2]``.

* SS flow (:class:`recon3d.models.trellis.SparseStructureFlowModel`, dense DiT, patch 1): width
  128, 2 blocks, 4 heads, QK RMSNorm, cross-attention to 1,374 condition tokens (TRELLIS's DINOv2
  count) of width 64; latent grid R = 4, 8, 12, 16 -> 64 .. 4,096 tokens (16^3: TRELLIS's). Per
  size: one sampler step's model evaluation (no grad) and one training step (forward + backward of
  the flow loss), best of a few; then the log-log slope of time vs tokens between the two largest
  sizes (1 = linear, 2 = attention-bound).
* SLAT flow (:class:`recon3d.models.trellis.SLatFlowModel`, sparse DiT, patch 2 at 64^3): width
  128, 2 blocks, io channels [32]; voxels drawn from a sphere shell of the 64^3 grid (a surface,
  like TRELLIS's structures), 1k .. 16k voxels (TRELLIS trains up to 32,768); same two timings and
  the slope. Token count of the transformer = coarse 32^3 voxels, printed beside.
* End to end: :class:`recon3d.methods.trellis.TrellisModule` of ``configs/trellis_cpu.yaml``
  (untrained: tiny DINOv2 at 56 px, SS flow 4^3 -> 8^3 structure, SLAT flow at 8^3, TRELLIS's
  Gaussian decoder with 4 Gaussians per voxel, marching-cubes mesh of the SS logits), 4 + 4
  sampler steps with CFG, one object: wall time of condition / SS sampling / SS decode / SLAT
  sampling / decode / render (4 views at 32 px) / export (``.ply`` + ``.glb``), and their sum
  against the whole.

Measured (``--threads 2`` on the shared 2-core machine at load ~9, so +-30 % between runs; two runs):

* SS flow, eval / train step: 64 tokens 0.024 / 0.080 s, 512 0.11 / 0.29 s, 1,728 0.36 / 1.5 s,
  4,096 (TRELLIS's 16^3) 1.5 / 4.8 s (the other run: 1.16 / 4.5 s); slope 4,096 vs 1,728 1.3-1.7
  (eval), 0.7-1.3 (train): the 4,096-token self-attention starts to dominate the linear parts.
* SLAT flow, eval / train step: 1k voxels (805 coarse tokens) 0.32 / 0.90 s, 4k (1,758) 0.76 /
  2.8 s, 16k (3,720) 3.7 / 9.9 s (the other run 4.3 / 21 s under heavier load); per voxel the
  cost grows about linearly (slope 0.9-1.1 vs voxels; 1.7-2.1 vs coarse tokens, which grow slower
  than the voxels of a shell).
* End to end, untrained tiny model, 303 voxels: 1.6 s, of which SLAT sampling 24 %, rendering 4
  views 22 %, export (``.ply`` + ``.glb`` through trimesh) 41 %, SS sampling 6 %, condition 3 %;
  the stages sum to the total within 1 %.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (bench_flow's docstring)

import argparse  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


def _best(fn, repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _eval_and_train(net, x0, t, cond, objective, repeats: int) -> tuple[float, float]:
    """Best seconds of one evaluation (no grad) and of one flow-loss forward + backward."""
    with torch.no_grad():
        t_eval = _best(lambda: net(x0, t, cond), repeats)

    def step():
        net.zero_grad(set_to_none=True)
        objective.loss(net, x0, cond, generator=torch.Generator().manual_seed(0)).loss.backward()

    return t_eval, _best(step, repeats)


def _slope(rows: list[dict], key: str, x: str = "tokens") -> float:
    a, b = rows[-2], rows[-1]
    return math.log(b[key] / a[key]) / math.log(b[x] / a[x])


def ss_flow_rows(resolutions=(4, 8, 12, 16), width: int = 128, cond_tokens: int = 1374, repeats: int = 3) -> list[dict]:
    """Per latent resolution: tokens, eval seconds, train-step seconds of the SS flow."""
    from recon3d.models.flow import RectifiedFlowObjective
    from recon3d.models.trellis import SparseStructureFlowModel

    obj = RectifiedFlowObjective.trellis()
    rows = []
    for R in resolutions:
        torch.manual_seed(0)
        net = SparseStructureFlowModel(R, 8, width, 64, 8, num_blocks=2, num_heads=4, mlp_ratio=4, patch_size=1, qk_rms_norm=True)
        x0 = torch.randn(1, 8, R, R, R)
        cond = torch.randn(1, cond_tokens, 64)
        t_eval, t_train = _eval_and_train(net, x0, torch.full((1,), 500.0), cond, obj, repeats)
        rows.append({"R": R, "tokens": R**3, "eval": t_eval, "train": t_train})
    return rows


def _shell_voxels(n: int, resolution: int = 64, seed: int = 0) -> torch.Tensor:
    """``(n, 3)`` distinct voxel indices on a sphere shell of the grid (a surface-like structure)."""
    R = resolution
    idx = torch.stack(torch.meshgrid(*[torch.arange(R)] * 3, indexing="ij"), -1).reshape(-1, 3)
    r = ((idx.float() + 0.5) / R - 0.5).norm(dim=1)
    # grow the shell until it holds n voxels
    width = 0.5 / R
    while True:
        cand = idx[(r - 0.35).abs() < width]
        if cand.shape[0] >= n:
            break
        width *= 1.5
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(cand.shape[0], generator=g)[:n].sort().values
    return cand[pick]


def slat_flow_rows(counts=(1024, 4096, 16384), width: int = 128, cond_tokens: int = 1374, repeats: int = 2) -> list[dict]:
    """Per voxel count: coarse tokens, eval seconds, train-step seconds of the SLAT flow."""
    from recon3d.models.flow import RectifiedFlowObjective
    from recon3d.models.trellis import SLatFlowModel
    from recon3d.representations import SparseVoxels

    obj = RectifiedFlowObjective.trellis()
    torch.manual_seed(0)
    net = SLatFlowModel(64, 8, width, 64, 8, num_blocks=2, num_heads=4, mlp_ratio=4, patch_size=2, num_io_res_blocks=2,
                        io_block_channels=[32], qk_rms_norm=True)
    cond = torch.randn(1, cond_tokens, 64)
    t = torch.full((1,), 500.0)
    rows = []
    for n in counts:
        xyz = _shell_voxels(n)
        x0 = SparseVoxels(torch.cat([torch.zeros(n, 1, dtype=torch.int64), xyz], 1), torch.randn(n, 8), 64, 1)
        coarse = torch.unique(xyz // 2, dim=0).shape[0]
        t_eval, t_train = _eval_and_train(net, x0, t, cond, obj, repeats)
        rows.append({"voxels": n, "tokens": coarse, "eval": t_eval, "train": t_train})
    return rows


def _tiny_module():
    """The TrellisModule of ``configs/trellis_cpu.yaml`` (built through the CLI, untrained)."""
    from pathlib import Path

    from recon3d.cli import run_lightning_cli

    torch.manual_seed(0)
    cfg = Path(__file__).resolve().parents[1] / "configs/trellis_cpu.yaml"
    with tempfile.TemporaryDirectory() as d:
        cli = run_lightning_cli(["-c", str(cfg), "--trainer.logger", "false", "--data.dataset.init_args.cache_dir", d], run=False)
    return cli.model.eval()


def end_to_end(views: int = 4, size: int = 32) -> dict:
    """Wall seconds per stage of one tiny sample (module docstring), plus ``total`` and ``voxels``."""
    from recon3d.data.cameras import orbit_cameras
    from recon3d.representations.reconstruction import Reconstruction

    model = _tiny_module()
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, size, size, generator=g)
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    cams = orbit_cameras(torch.arange(views) * 360.0 / views, torch.full((views,), 20.0), 2.6, 40.0, size, size).reshape(1, views)
    out, t = {}, {}

    def timed(name, fn):
        t0 = time.perf_counter()
        r = fn()
        t[name] = time.perf_counter() - t0
        return r

    t_all = time.perf_counter()
    with torch.no_grad():
        conds = timed("condition", lambda: [model.condition(image, mask, torch.ones(3))])
        gens = [torch.Generator().manual_seed(1)]
        f = model.ss_flow
        sampler = model._sampler(model.ss_sampler_params, 1)
        noise = sampler.noise_like(torch.zeros(1, f.in_channels, f.resolution, f.resolution, f.resolution), gens)
        z = timed("ss_sampling", lambda: sampler.sample(f, noise, conds[0]).samples)
        from recon3d.models.trellis import occupancy_to_voxels

        logits = timed("ss_decode", lambda: model.ss_decoder(z))
        structure = occupancy_to_voxels(logits, ["bench"])
        slat = timed("slat_sampling", lambda: model.sample_slat(conds, structure.replace(feats=structure.feats[:, :0]), gens))
        gaussians, meshes = timed("decode", lambda: model.decode(slat, structure, logits))
        rec = Reconstruction(["bench"], gaussians, {"mesh": meshes})
        timed("render", lambda: model.render_reconstruction(rec, cams))
    with tempfile.TemporaryDirectory() as d:
        timed("export", lambda: model.export_reconstruction(rec, d))
    out.update(t)
    out["total"] = time.perf_counter() - t_all
    out["voxels"] = structure.num_voxels
    return out


def main(quick: bool = False) -> dict:
    """Print the three tables; return their rows."""
    reps = 1 if quick else 3
    ss = ss_flow_rows((4, 8) if quick else (4, 8, 12, 16), repeats=reps)
    print(f"\nSS flow (dense DiT, width 128, 2 blocks, 1,374 condition tokens), threads {torch.get_num_threads()}")
    print(f"  {'R':>3} {'tokens':>7} {'eval s':>9} {'train s':>9}")
    for r in ss:
        print(f"  {r['R']:>3} {r['tokens']:>7} {r['eval']:>9.4f} {r['train']:>9.4f}")
    print(f"  slope d log t / d log tokens (last two): eval {_slope(ss, 'eval'):.2f}, train {_slope(ss, 'train'):.2f}")

    sl = slat_flow_rows((512, 2048) if quick else (1024, 4096, 16384), repeats=max(1, reps - 1))
    print("\nSLAT flow (sparse DiT at 64^3, patch 2, width 128, 2 blocks)")
    print(f"  {'voxels':>7} {'tokens':>7} {'eval s':>9} {'train s':>9}")
    for r in sl:
        print(f"  {r['voxels']:>7} {r['tokens']:>7} {r['eval']:>9.4f} {r['train']:>9.4f}")
    print(f"  slope vs coarse tokens (last two): eval {_slope(sl, 'eval'):.2f}, train {_slope(sl, 'train'):.2f}; "
          f"vs voxels: eval {_slope(sl, 'eval', 'voxels'):.2f}, train {_slope(sl, 'train', 'voxels'):.2f}")

    e2e = end_to_end()
    stages = ("condition", "ss_sampling", "ss_decode", "slat_sampling", "decode", "render", "export")
    print(f"\nend to end (configs/trellis_cpu.yaml, 4 + 4 steps with CFG, {e2e['voxels']} voxels): total {e2e['total']:.3f} s")
    for s in stages:
        print(f"  {s:<14} {e2e[s]:>8.4f} s  {100 * e2e[s] / e2e['total']:5.1f} %")
    print(f"  {'sum of stages':<14} {sum(e2e[s] for s in stages):>8.4f} s")
    return {"ss_flow": ss, "slat_flow": sl, "end_to_end": e2e}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    main(a.quick)
