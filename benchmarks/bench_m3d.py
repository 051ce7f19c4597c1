"""Benchmark: M3D vs the SSR baseline (paper §V-A ablation rows) after the same short training run.

Run: ``.venv/bin/python benchmarks/bench_m3d.py [--quick] [--device cuda] [--steps N] [--seeds K]``.

Both models are built from ``configs/m3d_cpu.yaml`` plus ``configs/m3d/{m3d,baseline}.yaml``
(the same ablation override files a user composes), trained with the same seed, data order and
step count on the synthetic single-view set (one input view = the target view; depth stream fed
the input view's rendered depth), stage 1 (L3D) for the first 70 % of the steps and stage 2
(+ VolSDF rgb/depth/normal losses) for the rest. Then each held-out object's SDF is meshed
(marching cubes) and scored with the SSR/M3D protocol (``EvaluationProtocol(geometry_preset="m3d")``:
CD x1000 on squared distances, F-score at τ = 0.002 on squared distances (in %), NC).

A tiny model trained for minutes on a procedural set says nothing about the paper's 3D-FRONT
numbers; the table shows that both variants train and evaluate through the same code path and how
far each gets in the same budget.

Last, the FLOPs of one training step per stage (forward + backward, ``recon3d.models.flops``),
its time, and their ratio to the fp32 matmul peak measured in the same run (a CPU "MFU").
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch


def _build(variant: str, num_objects: int, num_test: int, device: str, seed: int = 0):
    from recon3d.cli import run_lightning_cli

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = run_lightning_cli(
            ["-c", "configs/m3d_cpu.yaml", "-c", f"configs/m3d/{variant}.yaml", "--seed_everything", str(seed),
             "--data.dataset.init_args.num_objects", str(num_objects), "--data.num_val_objects", "0",
             "--data.num_test_objects", str(num_test), "--model.init_args.stage", "sdf",
             "--model.init_args.evaluation.init_args.num_points", "2048", "--model.init_args.num_render_rays", "64"]
            # the SSR deep encoder at the CPU config's scale (its default width 64 is the paper's); a new
            # class_path starts from that class's defaults, so the CPU shallow encoder's 128 channels are given
            + ([] if variant == "m3d" else ["--model.init_args.deep.init_args.width", "16",
                                            "--model.init_args.deep.init_args.in_channels", "128"]),
            run=False,
        )
    return cli.model.to(device), cli.datamodule


def _train(model, dm, steps: int, device: str, seed: int = 0) -> tuple[float, float, float]:
    torch.manual_seed(seed)
    model.train()
    opt_cfg = model.configure_optimizers()
    opt = opt_cfg["optimizer"] if isinstance(opt_cfg, dict) else opt_cfg
    switch = int(0.7 * steps)
    loader = dm.train_dataloader()
    it, step, t0 = iter(loader), 0, time.perf_counter()
    first = last = float("nan")
    while step < steps:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        model.stage = "sdf" if step < switch else "full"
        model.apply_lr_schedule([opt], step)  # the module's step decay, as in Lightning's loop
        terms = model.training_losses(batch.to(device))
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        if step == 0:
            first = float(terms["sdf"].detach())
        last = float(terms["sdf"].detach())
        step += 1
    return time.perf_counter() - t0, first, last


@torch.no_grad()
def _evaluate(model, dm, device: str) -> dict[str, float]:
    model.eval()
    ev = model.evaluation
    ev.reset()
    for batch in dm.test_dataloader():
        batch = batch.to(device)
        geo = model.predict_geometry(batch)
        ev.update_geometry(batch.object_ids, geo["points"], batch.geometry.surface_points, geo["normals"], batch.geometry.surface_normals)
    res = ev.compute()
    ev.reset()
    return res


def bench_step_flops(quick: bool, device: str = "cpu", num_objects: int = 10, num_test: int = 3) -> None:
    """FLOPs per training step of the ``m3d`` variant in each stage (``recon3d.models.flops``:
    FlopCounterMode plus CPU attention and the fused scan kernel; torch's count alone printed too),
    median step time, and the ratio to the fp32 matmul peak measured in the same run (CPU "MFU")."""
    from recon3d.models.flops import flop_counter, matmul_peak

    model, dm = _build("m3d", num_objects, num_test, device)
    dm.prepare_data()
    batch = next(iter(dm.train_dataloader())).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    model.train()
    rows = []
    for stage in ("sdf", "full"):
        model.stage = stage
        counts = {}
        for name, formulas in (("torch", {}), ("recon3d", None)):
            with flop_counter(formulas=formulas) as fc:
                model.training_losses(batch)["loss"].backward()
            counts[name] = fc.get_total_flops()
        times = []
        for _ in range(1 if quick else 5):
            model.zero_grad(set_to_none=True)
            sync()
            t = time.perf_counter()
            model.training_losses(batch)["loss"].backward()
            sync()
            times.append(time.perf_counter() - t)
        rows.append((stage, counts, sorted(times)[len(times) // 2]))
    peak = matmul_peak(device=device)
    print(f"MFU, m3d_cpu training step (forward + backward), fp32 matmul peak {peak / 1e9:.1f} GFLOP/s, "
          f"torch threads {torch.get_num_threads()}:")
    for stage, counts, step in rows:
        f = counts["recon3d"]
        print(f"  stage {stage:<4}: {step * 1e3:6.0f} ms, {f / 1e9:.3f} GFLOP (torch FlopCounterMode alone {counts['torch'] / 1e9:.3f}), "
              f"{f / step / 1e9:.2f} GFLOP/s, MFU {f / step / peak:.3f}")


def main(quick: bool = False, device: str = "cpu", steps: int | None = None, seeds: int = 1) -> None:
    """Train ``m3d`` and ``baseline`` for the same steps and print CD / F-score / NC on held-out objects.

    With ``seeds > 1`` each variant is trained once per seed (initialisation and sampling differ,
    the objects do not) and the table adds a mean +- std row per variant: differences smaller than
    the spread over seeds are noise.
    """
    steps = steps or (40 if quick else 150)
    num_objects, num_test = (10, 3) if quick else (16, 4)
    print(f"bench_m3d: synthetic single-view, {num_objects - num_test} train / {num_test} test objects, {steps} steps "
          f"(stage 2 from step {int(0.7 * steps)}), {seeds} seed(s), device {device}, torch threads {torch.get_num_threads()}")
    rows = []
    for seed in range(seeds):
        for variant in ("m3d", "baseline"):
            model, dm = _build(variant, num_objects, num_test, device, seed)
            dm.prepare_data()
            n_params = sum(p.numel() for p in model.parameters())
            secs, first, last = _train(model, dm, steps, device, seed)
            res = _evaluate(model, dm, device)
            rows.append((variant, seed, n_params, secs, first, last, res))
    nan = float("nan")
    print(f"{'variant':<10} {'seed':>4} {'params':>8} {'train s':>8} {'L3D first':>10} {'L3D last':>9} {'CD x1000':>9} {'F-score %':>10} {'NC':>6}")
    for variant, seed, n, secs, first, last, res in rows:
        print(f"{variant:<10} {seed:>4} {n:>8d} {secs:>8.1f} {first:>10.4f} {last:>9.4f} {res.get('cd', nan):>9.3f} "
              f"{res.get('fscore', nan):>10.2f} {res.get('nc', nan):>6.3f}")
    if seeds > 1:
        print("mean +- std over seeds")
        for variant in ("m3d", "baseline"):
            vals = {k: torch.tensor([r[6].get(k, nan) for r in rows if r[0] == variant]) for k in ("cd", "fscore", "nc")}
            last = torch.tensor([r[5] for r in rows if r[0] == variant])
            print(f"{variant:<10} L3D last {last.mean():.4f} +- {last.std():.4f}   CD {vals['cd'].mean():.3f} +- {vals['cd'].std():.3f}   "
                  f"F {vals['fscore'].mean():.2f} +- {vals['fscore'].std():.2f}   NC {vals['nc'].mean():.3f} +- {vals['nc'].std():.3f}")
    bench_step_flops(quick, device, num_objects, num_test)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="40 steps, 10 objects")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--steps", type=int, default=None, help="training steps per variant (default 150; quick 40)")
    ap.add_argument("--seeds", type=int, default=1, help="repeat each variant over this many seeds (mean +- std)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    main(a.quick, a.device, a.steps, a.seeds)
