"""``recon3d export``: reconstruct objects with a trained checkpoint and write meshes/turntables.

Equivalent to ``recon3d predict`` with the export options spelled out::

    recon3d export -c configs/gtr_cpu.yaml --ckpt outputs/.../last.ckpt --out exports/ [--views DIR --views-format gtr] [--format glb,ply]

Without ``--views`` the held-out test objects of the config's dataset are exported. With
``--views DIR`` the folder is read with ``--views-format`` (``gtr``: ``rgb_XXX.png`` +
``cam_XXX.txt``; ``blender``: ``transforms.json``; ``openlrm``; ``instantmesh``) and every object in
it is reconstructed from all of its views (up to ``data.num_input_views``).

``--format`` (repeatable or comma-separated) chooses the files each object is written as, from
what the method's representation supports (:func:`recon3d.render.export.export_formats`: a
mesh ``glb obj ply gif mp4``, Gaussians ``ply gif mp4``, sparse voxels ``ply``); without it the
method writes its default set. A format the representation does not support stops the export
with one line listing the supported ones (exit status 2). ``--format gtr`` (a views reader's name,
the option's earlier meaning) is still read as ``--views-format gtr``.

The checkpoint is loaded strictly (:func:`recon3d.utils.checkpoint.load_weights_into`): weights
that do not fit the config's model, or a checkpoint of another method ("this checkpoint is an
M3DModule, the config is a GTRModule"), stop the export with one error line; keys that may differ
are named in ``model.init_args.init_weights_ignore``. The closing line counts the files actually
written under ``--out`` (new or changed: every mesh, turntable and texture of every object,
``exports.json`` and the ``config.yaml`` Lightning saves).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from recon3d.commands import OneLineParser

FORMATS = {
    "gtr": "recon3d.data.formats.GTRViewsDataset",
    "blender": "recon3d.data.formats.BlenderDataset",
    "openlrm": "recon3d.data.formats.OpenLRMDataset",
    "instantmesh": "recon3d.data.formats.InstantMeshDataset",
}


def main(argv: list[str]) -> int:
    p = OneLineParser(prog="recon3d export", description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", required=True, action="append", help="config file(s), composed in order")
    p.add_argument("--ckpt", required=True, help="trained checkpoint (.ckpt)")
    p.add_argument("--out", default="outputs/export", help="output folder")
    p.add_argument("--views", default=None, help="folder of posed views to reconstruct")
    p.add_argument("--views-format", default=None, choices=sorted(FORMATS), help="format of --views (default gtr)")
    p.add_argument("--format", action="append", default=None, metavar="FMT[,FMT]",
                   help="output formats, from what the method's representation supports (default: the method's own set)")
    p.add_argument("--allow-pickle", action="store_true", help="trust a checkpoint that needs pickled code")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="LightningCLI overrides after --, e.g. -- --model.init_args.export_resolution 128")
    a = p.parse_args(argv)
    views_format, out_formats = _split_formats(a.views_format, a.format)

    from recon3d.cli import run_lightning_cli
    from recon3d.utils.io import atomic_write_text

    args: list[str] = []
    for c in a.config:
        args += ["-c", c]
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        from recon3d.errors import ConfigError

        raise ConfigError(f"--out {out}: is a file, expected a folder for the exports")
    args += ["--trainer.default_root_dir", str(out), "--trainer.logger", "false", "--trainer.callbacks", "[]"]
    if a.views:
        args += ["--data.test_dataset", json.dumps({"class_path": FORMATS[views_format], "init_args": {"root": a.views}}),
                 "--data.num_target_views", "0", "--data.supervise_inputs", "true", "--data.eval_view_sampling", "fixed"]
    args += [x for x in a.overrides if x != "--"]
    before = _snapshot(out)
    # The checkpoint's model options define the trained model; run-time options (export level and
    # resolution, refinement, evaluation) come from this command line, as for `recon3d predict`.
    cli = run_lightning_cli(args, run=False, hparams_from=a.ckpt, allow_pickle=a.allow_pickle)
    if out_formats:
        cli.model.export_formats = _check_formats(cli.model, out_formats)
    from recon3d.utils.checkpoint import load_weights_into

    load_weights_into(cli.model, a.ckpt, strict=True, allow_pickle=a.allow_pickle, ignore=getattr(cli.model, "init_weights_ignore", None))
    cli.model._export_root = out
    results = cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    objects = [obj for batch in results for obj in batch]
    atomic_write_text(out / "exports.json", json.dumps(objects, indent=2))
    after = _snapshot(out)
    written = [p for p, sig in after.items() if before.get(p) != sig]
    empty = sum(1 for obj in objects if not written_files([obj]))
    note = f"; {empty} object(s) gave nothing to export (see the log)" if empty else ""
    print(f"exported {len(objects)} objects to {out} ({len(written)} files written{note})")
    return 0


def _split_formats(views_format: str | None, formats: list[str] | None) -> tuple[str, list[str]]:
    """``--views-format`` and the output formats of ``--format``; a views reader's name given to
    ``--format`` (its earlier meaning) is taken as ``--views-format``."""
    from recon3d.errors import ConfigError

    names = [f.strip().lower().lstrip(".") for v in (formats or []) for f in v.split(",") if f.strip()]
    legacy = [f for f in names if f in FORMATS]
    if legacy:
        if views_format is not None and legacy != [views_format] or len(set(legacy)) > 1:
            raise ConfigError(f"--format {','.join(legacy)}: a views format; give one, as --views-format (got --views-format {views_format})")
        views_format = legacy[0]
    return views_format or "gtr", [f for f in names if f not in FORMATS]


def _check_formats(model, formats: list[str]) -> tuple[str, ...]:
    """``formats`` if the model's representation supports them, else one ConfigError line."""
    from recon3d.errors import ConfigError
    from recon3d.render.export import check_export_formats

    # The instance's: a wrapper method (BoostModule) exports what the method it wraps does.
    kind = getattr(model, "EXPORT_REPRESENTATION", None)
    if kind is None:
        raise ConfigError(f"--format: {type(model).__name__} declares no export representation (EXPORT_REPRESENTATION); it writes its own files")
    return check_export_formats(kind, formats, what="--format")


def _snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """``path -> (inode, mtime_ns, size)`` of every file under ``folder``: the files an export
    wrote are those new or changed between two snapshots (meshes, turntables, textures,
    ``exports.json``, the ``config.yaml`` Lightning saves)."""
    if not folder.is_dir():
        return {}
    out = {}
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            out[str(p)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def written_files(objects: list[dict[str, str]]) -> set[str]:
    """The distinct files on disk named by the objects' export dicts (``{name: path}``; values
    that are not paths of existing files, such as ``refine_psnr``, are not counted)."""
    out = set()
    for obj in objects:
        for v in obj.values():
            if isinstance(v, str) and v and Path(v).is_file():
                out.add(str(Path(v).resolve()))
    return out
