"""Benchmark: M3D vs the SSR baseline (paper §V-A ablation rows) after the same short training run.

Run: ``.venv/bin/python benchmarks/bench_m3d.py [--quick] [--device cuda] [--steps N]``.

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
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch


def _build(variant: str, num_objects: int, num_test: int, device: str):
    from recon3d.cli import run_lightning_cli

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = run_lightning_cli(
            ["-c", "configs/m3d_cpu.yaml", "-c", f"configs/m3d/{variant}.yaml",
             "--data.dataset.init_args.num_objects", str(num_objects), "--data.num_val_objects", "0",
             "--data.num_test_objects", str(num_test), "--model.init_args.stage", "sdf",
             "--model.init_args.evaluation.init_args.num_points", "2048", "--model.init_args.num_render_rays", "64"]
            # the SSR deep encoder at the CPU config's scale (its default width 64 is the paper's)
            + ([] if variant == "m3d" else ["--model.init_args.deep.init_args.width", "16"]),
            run=False,
        )
    return cli.model.to(device), cli.datamodule


def _train(model, dm, steps: int, device: str) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model.train()
    opt_cfg = model.configure_optimizers()
    opt = opt_cfg["optimizer"]
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


def main(quick: bool = False, device: str = "cpu", steps: int | None = None) -> None:
    """Train ``m3d`` and ``baseline`` for the same steps and print CD / F-score / NC on held-out objects."""
    steps = steps or (40 if quick else 150)
    num_objects, num_test = (10, 3) if quick else (16, 4)
    print(f"bench_m3d: synthetic single-view, {num_objects - num_test} train / {num_test} test objects, {steps} steps "
          f"(stage 2 from step {int(0.7 * steps)}), device {device}, torch threads {torch.get_num_threads()}")
    rows = []
    for variant in ("m3d", "baseline"):
        model, dm = _build(variant, num_objects, num_test, device)
        dm.prepare_data()
        n_params = sum(p.numel() for p in model.parameters())
        secs, first, last = _train(model, dm, steps, device)
        res = _evaluate(model, dm, device)
        rows.append((variant, n_params, secs, first, last, res))
    print(f"{'variant':<10} {'params':>8} {'train s':>8} {'L3D first':>10} {'L3D last':>9} {'CD x1000':>9} {'F-score %':>10} {'NC':>6}")
    for variant, n, secs, first, last, res in rows:
        print(f"{variant:<10} {n:>8d} {secs:>8.1f} {first:>10.4f} {last:>9.4f} {res.get('cd', float('nan')):>9.3f} "
              f"{res.get('fscore', float('nan')):>10.2f} {res.get('nc', float('nan')):>6.3f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="40 steps, 10 objects")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--steps", type=int, default=None, help="training steps per variant (default 150; quick 40)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    main(a.quick, a.device, a.steps)
