"""`recon3d predict` and `recon3d export --views` through the real CLI write meshes and turntables."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recon3d.cli import main, run_lightning_cli
from recon3d.models.gtr.mesh import density_grid

ROOT = Path(__file__).resolve().parents[2]
BASE = ["-c", str(ROOT / "configs/gtr_cpu.yaml"), "-c", str(ROOT / "configs/gtr/reliability.yaml")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Data cache, and the median density of the seed-0 model: a level at which a surface exists."""
    cache = tmp_path_factory.mktemp("cache")
    args = BASE + ["--data.dataset.init_args.cache_dir", str(cache), "--model.init_args.export_resolution", "24",
                   "--model.init_args.turntable_frames", "3"]
    cli = run_lightning_cli(args + ["--trainer.logger", "false"], run=False)
    cli.datamodule.prepare_data()
    batch = next(iter(cli.datamodule.predict_dataloader()))
    with torch.no_grad():
        grid = density_grid(cli.model.field, cli.model.triplanes(batch.inputs)[:1], 24)
    return args + ["--model.init_args.mesh_density_level", str(float(grid.median()))], cli, batch


def test_predict_subcommand_exports(setup, tmp_path):
    args, _, batch = setup
    code = main(["predict", *args, "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.callbacks", "[]"])
    assert code == 0
    obj = tmp_path / "run" / "predict" / batch.object_ids[0]
    for name in ("mesh.glb", "mesh.obj", "turntable.gif"):
        assert (obj / name).stat().st_size > 0, name


def test_export_from_views_folder(setup, tmp_path):
    from recon3d.data.formats import write_gtr_views

    args, cli, batch = setup
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": cli.model.state_dict()}, ckpt)
    v = batch.inputs
    write_gtr_views(tmp_path / "views", "my_object", v.images[0], v.masks[0], v.cameras[0])
    out = tmp_path / "out"
    level = args[args.index("--model.init_args.mesh_density_level") + 1]
    code = main(["export", "-c", BASE[1], "-c", BASE[3], "--ckpt", str(ckpt), "--views", str(tmp_path / "views"),
                 "--format", "gtr", "--out", str(out), "--", "--model.init_args.mesh_density_level", level,
                 "--model.init_args.export_resolution", "24", "--model.init_args.turntable_frames", "3"])
    assert code == 0
    assert (out / "my_object" / "mesh.glb").stat().st_size > 0
    assert (out / "exports.json").exists()


def _export(args, ckpt, views, out, *extra):
    level = args[args.index("--model.init_args.mesh_density_level") + 1]
    return main(["export", "-c", BASE[1], "-c", BASE[3], "--ckpt", str(ckpt), "--views", str(views), "--format", "gtr",
                 "--out", str(out), "--", "--model.init_args.mesh_density_level", level,
                 "--model.init_args.export_resolution", "24", "--model.init_args.turntable_frames", "3", *extra])


def test_export_counts_the_files_it_wrote(setup, tmp_path, capsys):
    """Issue 13: the count was of distinct file *names* over all objects (3 for 2 objects)."""
    from recon3d.data.formats import write_gtr_views

    args, cli, batch = setup
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": cli.model.state_dict()}, ckpt)
    v = batch.inputs
    for name in ("obj_a", "obj_b"):
        write_gtr_views(tmp_path / "views", name, v.images[0], v.masks[0], v.cameras[0])
    out = tmp_path / "out"
    assert _export(args, ckpt, tmp_path / "views", out) == 0
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    per_object = [f"{o}/{f}" for o in ("obj_a", "obj_b") for f in ("mesh.glb", "mesh.obj", "turntable.gif")]
    assert set(per_object) | {"exports.json"} <= set(on_disk)  # (+ Lightning's config.yaml)
    assert f"exported 2 objects to {out} ({len(on_disk)} files written)" in capsys.readouterr().out
    # a second export over the same folder rewrites them all: the same count, not 0
    assert _export(args, ckpt, tmp_path / "views", out) == 0
    assert f"({len(on_disk)} files written)" in capsys.readouterr().out


def test_export_refuses_a_checkpoint_of_another_method(setup, tmp_path, capsys):
    """Issue 13: an M3D checkpoint on a GTR config exported an untrained model with exit status 0."""
    from recon3d.data.formats import write_gtr_views

    args, cli, batch = setup
    ckpt = tmp_path / "m3d.ckpt"
    torch.save({"state_dict": {"net.shallow.stem.0.weight": torch.zeros(64, 3, 7, 7), "density.beta": torch.zeros(())},
                "hyper_parameters": {"_class_path": "recon3d.methods.m3d.M3DModule"}}, ckpt)
    v = batch.inputs
    write_gtr_views(tmp_path / "views", "obj", v.images[0], v.masks[0], v.cameras[0])
    out = tmp_path / "out"
    assert _export(args, ckpt, tmp_path / "views", out) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("recon3d: error:")]
    n = len(cli.model.state_dict())
    assert len(err) == 1 and "this checkpoint is an M3DModule, the config is a GTRModule" in err[0]
    assert f"0 of {n} model keys found" in err[0]
    assert not (out / "exports.json").exists()


def test_export_format_comes_from_the_representation(setup, tmp_path, capsys):
    """Issue 14: ``--format`` names output files from what the method's representation (a mesh for
    GTR) supports; the views reader moved to ``--views-format`` (``--format gtr`` still reads as it)."""
    import trimesh

    from recon3d.data.formats import write_gtr_views

    args, cli, batch = setup
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": cli.model.state_dict()}, ckpt)
    v = batch.inputs
    write_gtr_views(tmp_path / "views", "obj", v.images[0], v.masks[0], v.cameras[0])
    level = args[args.index("--model.init_args.mesh_density_level") + 1]
    common = ["export", "-c", BASE[1], "-c", BASE[3], "--ckpt", str(ckpt), "--views", str(tmp_path / "views")]
    runtime = ["--", "--model.init_args.mesh_density_level", level, "--model.init_args.export_resolution", "24"]
    out = tmp_path / "out"
    assert main([*common, "--views-format", "gtr", "--format", "ply", "--format", "glb", "--out", str(out), *runtime]) == 0
    files = sorted(p.name for p in (out / "obj").iterdir())
    assert files == ["mesh.glb", "mesh.ply"]
    assert len(trimesh.load(out / "obj" / "mesh.ply", force="mesh").faces) > 0
    capsys.readouterr()
    # a format a mesh cannot be written as: one line listing the supported ones, exit status 2
    assert main([*common, "--format", "gtr,splat", "--out", str(tmp_path / "bad"), *runtime]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "--format: Meshes cannot be exported as splat; supported: glb, obj, ply, gif, mp4" in err[0]
