"""``recon3d export``: reconstruct objects with a trained checkpoint and write meshes/turntables.

Equivalent to ``recon3d predict`` with the export options spelled out::

    recon3d export -c configs/gtr_cpu.yaml --ckpt outputs/.../last.ckpt --out exports/ [--views DIR --format gtr]

Without ``--views`` the held-out test objects of the config's dataset are exported. With
``--views DIR`` the folder is read with the given format (``gtr``: ``rgb_XXX.png`` +
``cam_XXX.txt``; ``blender``: ``transforms.json``; ``openlrm``; ``instantmesh``) and every object in
it is reconstructed from all of its views (up to ``data.num_input_views``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FORMATS = {
    "gtr": "recon3d.data.formats.GTRViewsDataset",
    "blender": "recon3d.data.formats.BlenderDataset",
    "openlrm": "recon3d.data.formats.OpenLRMDataset",
    "instantmesh": "recon3d.data.formats.InstantMeshDataset",
}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="recon3d export", description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", required=True, action="append", help="config file(s), composed in order")
    p.add_argument("--ckpt", required=True, help="trained checkpoint (.ckpt)")
    p.add_argument("--out", default="outputs/export", help="output folder")
    p.add_argument("--views", default=None, help="folder of posed views to reconstruct")
    p.add_argument("--format", default="gtr", choices=sorted(FORMATS), help="format of --views")
    p.add_argument("--allow-pickle", action="store_true", help="trust a checkpoint that needs pickled code")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="LightningCLI overrides after --, e.g. -- --model.init_args.export_resolution 128")
    a = p.parse_args(argv)

    from recon3d.cli import run_lightning_cli
    from recon3d.utils.io import atomic_write_text

    args: list[str] = []
    for c in a.config:
        args += ["-c", c]
    out = Path(a.out)
    args += ["--trainer.default_root_dir", str(out), "--trainer.logger", "false", "--trainer.callbacks", "[]"]
    if a.views:
        args += ["--data.test_dataset", json.dumps({"class_path": FORMATS[a.format], "init_args": {"root": a.views}}),
                 "--data.num_target_views", "0", "--data.supervise_inputs", "true", "--data.eval_view_sampling", "fixed"]
    args += [x for x in a.overrides if x != "--"]
    cli = run_lightning_cli(args, run=False)
    from recon3d.utils.checkpoint import load_weights_into

    load_weights_into(cli.model, a.ckpt, strict=False, allow_pickle=a.allow_pickle)
    cli.model._export_root = out
    results = cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    files = {k: v for batch in results for obj in batch for k, v in obj.items()}
    atomic_write_text(out / "exports.json", json.dumps([obj for batch in results for obj in batch], indent=2))
    print(f"exported {sum(len(b) for b in results)} objects to {out} ({len(files)} files)")
    return 0
