"""One rule for a checkpoint and the command line, in ``predict`` and ``export`` alike (issue 13).

The checkpoint's hyper-parameters define the trained model (``n_samples`` here); the module's
``RUNTIME_OPTIONS`` (``mesh_density_level``, ``export_resolution`` …) come from the command line.
Before, ``predict --ckpt_path`` silently used the checkpoint's ``mesh_density_level`` while
``export`` honoured the flag. Reference: the trained weights loaded with plain
``torch.load``/``load_state_dict`` and the field's density evaluated at the exported vertices
(read back with trimesh): they sit on the requested iso-level, not on the checkpoint's.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from recon3d.cli import main, run_lightning_cli
from recon3d.methods.gtr import GTRModule
from recon3d.models.gtr.mesh import density_grid

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [str(ROOT / "configs/gtr_cpu.yaml"), str(ROOT / "configs/gtr/reliability.yaml")]
BASE = ["-c", CONFIGS[0], "-c", CONFIGS[1]]
SAVED_LEVEL = 1.5  # gtr_cpu.yaml's mesh_density_level, saved in the checkpoint


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue() + err.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real 1-step GTR checkpoint, the same weights loaded independently, and an iso-level
    with a surface that is far from the checkpoint's."""
    d = tmp_path_factory.mktemp("ckpt_options")
    data = ["--data.dataset.init_args.cache_dir", str(d / "cache")]
    rc, text = _run(["fit", *BASE, *data, "--run_dir", str(d / "fit"), "--trainer.max_epochs", "1", "--trainer.max_steps", "1"])
    assert rc == 0, text[-3000:]
    ckpt = d / "fit" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["mesh_density_level"] == SAVED_LEVEL and saved["hyper_parameters"]["n_samples"] == 8
    cli = run_lightning_cli([*BASE, *data, "--trainer.logger", "false"], run=False)
    model = cli.model.eval()
    model.load_state_dict(saved["state_dict"])
    cli.datamodule.prepare_data()
    batch = next(iter(cli.datamodule.predict_dataloader()))
    from recon3d.data.batch import Views

    v = batch.inputs
    with torch.no_grad():
        planes = model.triplanes(Views(v.images[:1], v.cameras[:1], None if v.masks is None else v.masks[:1]))
        grid = density_grid(model.field, planes, 24)
    levels = [float(grid.flatten().quantile(q)) for q in (0.2, 0.5, 0.8)]
    level = max(levels, key=lambda x: abs(x - SAVED_LEVEL))
    assert abs(level - SAVED_LEVEL) > 0.05, levels
    return d, data, ckpt, model, planes, batch.object_ids[0], level


def _runtime(level: float) -> list[str]:
    return ["--model.init_args.mesh_density_level", repr(level), "--model.init_args.export_resolution", "24",
            "--model.init_args.turntable_frames", "0", "--model.init_args.n_samples", "16"]


def test_predict_and_export_agree_and_honour_the_command_line(trained):
    import trimesh

    d, data, ckpt, model, planes, obj, level = trained
    rc, text = _run(["predict", *BASE, *data, "--run_dir", str(d / "pred"), "--ckpt_path", str(ckpt), *_runtime(level),
                     "--trainer.callbacks", "[]"])
    assert rc == 0, text[-3000:]
    # the architecture came from the checkpoint, and the CLI said so on one line
    notes = [ln for ln in text.splitlines() if "model options from the checkpoint" in ln]
    assert len(notes) == 1 and "n_samples=8 (command line: 16)" in notes[0] and "mesh_density_level" not in notes[0], notes
    rc, text = _run(["export", *BASE, "--ckpt", str(ckpt), "--out", str(d / "exp"), "--", *data, *_runtime(level)])
    assert rc == 0, text[-3000:]
    assert any("n_samples=8 (command line: 16)" in ln for ln in text.splitlines()), text[-2000:]
    predicted, exported = d / "pred" / "predict" / obj, d / "exp" / obj
    for name in ("mesh.obj", "mesh.glb"):
        assert (predicted / name).read_bytes() == (exported / name).read_bytes(), name
    mesh = trimesh.load(predicted / "mesh.obj", process=False, force="mesh")
    verts = torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32)[None]
    with torch.no_grad():
        dens = model.field.density(planes, verts).flatten()
    median = float(dens.median())
    assert abs(median - level) < 0.25 * abs(level - SAVED_LEVEL), (median, level)


def test_runtime_options_are_declared_by_the_module():
    assert {"mesh_density_level", "export_resolution", "refine", "eval_chunk", "evaluation"} <= GTRModule.RUNTIME_OPTIONS
    assert not {"n_samples", "stage", "lr", "encoder", "generator", "field"} & GTRModule.RUNTIME_OPTIONS
