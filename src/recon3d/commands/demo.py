"""``recon3d demo``: the main job on the embedded synthetic data, end to end, on a CPU.

Trains GTR's NeRF stage (``configs/gtr_demo.yaml``: the CPU-size GTR of ``configs/gtr_cpu.yaml``
with options that are not in the paper, each commented there: projected feature lifting, a
pixel-aligned field, the mesh stage's depth and free-space terms, a blurred density grid for the
meshes, and a shorter schedule) on procedurally generated objects, with the config's strategy
(two DDP processes of one thread each on a 2-core CPU); then, in one process, evaluates the
held-out objects under the shared protocol (``test/metrics.csv``, per-object CSV) and exports
each held-out object as a mesh (``.glb`` + ``.obj`` with vertex colours, a turntable GIF, and
the texture-refined variant). Every output lands under ``--out``; a summary is printed and
written to ``summary.json``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from recon3d.commands import OneLineParser
from recon3d.utils.io import atomic_write_text


def _cli_args(config: str, out: Path, steps: int | None, extra: list[str]) -> list[str]:
    args = ["-c", config, "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
            "--trainer.logger.init_args.name", "gtr", "--trainer.logger.init_args.version", "demo"]
    if steps is not None:
        args += ["--trainer.max_steps", str(steps)]
    return args + extra


def main(argv: list[str]) -> int:
    p = OneLineParser(prog="recon3d demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[3] / "configs" / "gtr_demo.yaml"),
                   help="method config (default: configs/gtr_demo.yaml)")
    p.add_argument("--out", default="outputs/demo", help="output folder")
    p.add_argument("--steps", type=int, default=None, help="override trainer.max_steps")
    p.add_argument("overrides", nargs="*", help="extra LightningCLI overrides, e.g. --data.batch_size=4 (after --)")
    a = p.parse_args(argv)

    import torch

    from recon3d.cli import run_lightning_cli

    out = Path(a.out)
    run_dir = out / "gtr" / "demo"
    # With a multi-process strategy (configs/gtr_demo.yaml: DDP, 2 CPU processes) Lightning starts
    # the other ranks by re-running this command with LOCAL_RANK set: they join the training and
    # leave after it, and must not touch the outputs.
    launched_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    threads = torch.get_num_threads()
    if run_dir.exists() and launched_rank == 0:
        # The demo's own previous run: replaced so the checkpoint is `last.ckpt`, not `last-v1.ckpt`.
        import shutil

        print(f"recon3d demo: replacing the previous demo run in {run_dir}")
        shutil.rmtree(run_dir)
    t0 = time.time()
    cli = run_lightning_cli(_cli_args(a.config, out, a.steps, a.overrides), run=False)
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    dm.prepare_data()
    t_data = time.time() - t0
    _threads_per_process(trainer)
    trainer.fit(model, datamodule=dm)
    t_fit = time.time() - t0 - t_data
    processes, fit_threads, steps = trainer.world_size, torch.get_num_threads(), int(trainer.global_step)
    ckpt = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
    if processes > 1:
        if not trainer.is_global_zero:
            return 0
        trainer = _evaluation_trainer(trainer)
        torch.set_num_threads(threads)
    test = trainer.test(model, datamodule=dm, verbose=False)[0]
    predictions = trainer.predict(model, dataloaders=dm.predict_dataloader())
    log_dir = Path(trainer.logger.log_dir)
    exported = [obj for batch in predictions for obj in batch]
    ids = [i for batch in dm.predict_dataloader() for i in batch.object_ids]
    summary = {
        "wall_seconds": round(time.time() - t0, 1),
        "data_seconds": round(t_data, 1),
        "fit_seconds": round(t_fit, 1),
        "steps": steps,
        "processes": processes,
        "threads": fit_threads,
        "test_metrics": {k: round(float(v), 4) for k, v in test.items()},
        "checkpoint": ckpt,
        "metrics_csv": str(log_dir / "metrics.csv"),
        "test_metrics_csv": str(log_dir / "test" / "metrics.csv"),
        "grids": sorted(str(x) for x in log_dir.glob("*_grid_*.png")),
        "exports": dict(zip(ids, exported)),
    }
    summary["held_out_objects"] = len({r["object_id"] for r in _per_object_rows(log_dir / "test" / "per_object.csv")}) or None
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    print(summary_table(summary, out))
    return 0


def _threads_per_process(trainer) -> None:
    """Several CPU processes share the cores: one OpenMP thread team each of ``cores / processes``
    (set before the other ranks start, so they inherit it; an explicit OMP_NUM_THREADS wins).
    Without it the demo's two ranks ran 0.78 s/step instead of 0.63 on 2 cores."""
    import torch
    from lightning.pytorch.accelerators import CPUAccelerator

    procs = trainer.num_devices * trainer.num_nodes
    if procs > 1 and isinstance(trainer.accelerator, CPUAccelerator) and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = max(1, cores // procs)
        os.environ["OMP_NUM_THREADS"] = str(n)
        torch.set_num_threads(n)


def _evaluation_trainer(trainer):
    """A one-process trainer for the test and export after a multi-process fit, on rank 0.

    Every held-out object then goes through one evaluator and one PNG grid, and the summary lists
    every export (under DDP each rank would see half of them). The other ranks have left, so the
    process group is closed first; the logger (same run folder), the progress bar, the precision
    and the test/predict batch limits carry over.
    """
    import torch.distributed as dist
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ProgressBar

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    bars = [c for c in trainer.callbacks if isinstance(c, ProgressBar)]
    one = Trainer(accelerator=type(trainer.accelerator)(), devices=1, logger=trainer.logger, callbacks=bars,
                  enable_progress_bar=bool(bars), enable_model_summary=False, default_root_dir=trainer.default_root_dir,
                  precision=trainer.precision, limit_test_batches=trainer.limit_test_batches,
                  limit_predict_batches=trainer.limit_predict_batches)
    # the loops' progress (global step, epoch) carries over too: grids and logged rows keep the
    # training step, as after a one-process fit
    one.fit_loop.load_state_dict(trainer.fit_loop.state_dict())
    return one


def _per_object_rows(path: Path) -> list[dict]:
    import csv

    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


#: Test metrics shown by the summary table, in order, with their direction.
_TABLE = (("psnr", "PSNR (dB)", "higher"), ("ssim", "SSIM", "higher"), ("mask_iou", "silhouette IoU", "higher"),
          ("cd", "Chamfer x100 (gtr preset)", "lower"), ("fscore", "F-score", "higher"), ("nc", "normal consistency", "higher"),
          ("iou", "volume IoU (vs GT mesh)", "higher"),
          ("psnr_masked", "PSNR on the object (dB)", "higher"))


def _shown_grid(grids: list[str]) -> str:
    """The held-out objects' grid (``test_grid_*``) if there is one, else the last grid."""
    tests = [g for g in grids if Path(g).name.startswith("test_grid")]
    return (tests or grids or ["-"])[-1]


def _workers(summary: dict) -> str:
    n, t = summary.get("processes", 1), summary["threads"]
    threads = f"{t} thread{'s' if t != 1 else ''}"
    return threads if n == 1 else f"{n} processes x {threads}"


def summary_table(summary: dict, out: Path) -> str:
    """The demo's result as a small plain-text table (``summary.json`` has everything)."""
    from recon3d.utils.progress import format_duration

    m = {k.split("/", 1)[-1]: v for k, v in summary["test_metrics"].items()}
    lines = [
        f"recon3d demo: done in {format_duration(summary['wall_seconds'])} (data {format_duration(summary['data_seconds'])}, "
        f"training {format_duration(summary['fit_seconds'])} for {summary['steps']} steps on {_workers(summary)})",
        f"held-out objects: {summary.get('held_out_objects') or '?'}",
        "",
        f"  {'metric':<28}{'value':>9}",
        f"  {'-' * 28}{'-' * 9}",
    ]
    for key, label, better in _TABLE:
        if key in m:
            lines.append(f"  {label + (' ↑' if better == 'higher' else ' ↓'):<28}{m[key]:>9.4g}")
    missing = [label for key, label, _ in _TABLE[:4] if key not in m]
    if missing:
        lines.append(f"  (not measured: {', '.join(missing)}; see test/metrics.json)")
    n_files = sum(sum(1 for k in v if k != "skipped" and k != "refine_psnr") for v in summary["exports"].values() if isinstance(v, dict))
    n_skipped = sum(1 for v in summary["exports"].values() if isinstance(v, dict) and "skipped" in v)
    lines += [
        "",
        f"checkpoint   {summary['checkpoint'] or '-'}",
        f"metrics      {summary['test_metrics_csv']} (per object: per_object.csv beside it)",
        f"grids        {_shown_grid(summary['grids'])}" + (f" (+{len(summary['grids']) - 1} more)" if len(summary["grids"]) > 1 else ""),
        f"exports      {len(summary['exports']) - n_skipped} objects" + (f" ({n_skipped} skipped: no surface yet)" if n_skipped else "") + f", {n_files} files under {Path(summary['metrics_csv']).parent / 'predict'}",
        f"summary      {out / 'summary.json'}",
    ]
    return "\n".join(lines)
