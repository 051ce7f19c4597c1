"""Arguments of ``recon3d data pseudo-gt`` (:mod:`recon3d.commands.pseudo_gt`), apart from the
builder so that ``recon3d data --help`` imports neither torch nor Lightning."""

from __future__ import annotations

import argparse

__all__ = ["add_arguments"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, help="folder of input images (recursive; ids = relative paths without suffix)")
    p.add_argument("--generator", required=True, action="append",
                   help="MultiViewGenerator: config(s) (.yaml, composed) and/or a checkpoint (.ckpt) of recon3d's "
                        "MultiViewDiffusionModule, or an Era3D model folder (repeatable)")
    p.add_argument("--reconstructor", required=True, action="append",
                   help="reconstruction method: config(s) (.yaml, composed) and/or a checkpoint (.ckpt), e.g. LGM (repeatable)")
    p.add_argument("--strength", required=True, type=float, help="SDEdit strength s in [0, 1] (MVBoost's best: 0.95)")
    p.add_argument("--out", required=True, help="output folder (shards + manifest.json); the same folder resumes")
    p.add_argument("--shard-size", type=int, default=64, help="images per shard (default 64)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the per-object seeds (default 0)")
    p.add_argument("--batch-size", type=int, default=4, help="objects per model call (default 4)")
    p.add_argument("--input-views", default=None, help="comma-separated generator views fed to the reconstructor (default: see docs)")
    p.add_argument("--rank", type=int, default=None, help="this process's rank (default RANK or SLURM_PROCID, else 0)")
    p.add_argument("--world-size", type=int, default=None, help="number of processes (default WORLD_SIZE or SLURM_NTASKS, else 1)")
    p.add_argument("--device", default=None, help="torch device (default cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--allow-pickle", action="store_true", help="trust checkpoints that need pickled code")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
