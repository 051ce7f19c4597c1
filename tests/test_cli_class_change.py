"""Swapping a part's class_path does not carry the previous class's init_args (issue 12 item 5).

The reference is each class's own signature (``inspect``): after a swap, every init_arg not
given for the new class must be the new class's default. jsonargparse alone keeps the old values
of the init_args both classes accept (a synthetic set's ``num_surface_points: 2048`` reached a
3D-FRONT run).
"""

from __future__ import annotations

import contextlib
import inspect
import io
from pathlib import Path

import pytest
import yaml

from recon3d.cli import main
from recon3d.data.formats.front3d import Front3DDataset
from recon3d.data.synthetic import SyntheticDataset

ROOT = Path(__file__).resolve().parents[1]
M3D_CPU = str(ROOT / "configs" / "m3d_cpu.yaml")
FRONT3D = "recon3d.data.formats.front3d.Front3DDataset"


def _resolved(args: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(["fit", *args, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def _defaults(cls) -> dict:
    return {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not inspect.Parameter.empty}


def _assert_fresh(init_args: dict, cls, given: dict) -> None:
    for k, default in _defaults(cls).items():
        want = given.get(k, default)
        got = init_args[k]
        assert got == (list(want) if isinstance(want, tuple) else want), (k, got, want)


def test_base_config_shares_keys_with_front3d():
    """The premise: m3d_cpu.yaml's synthetic set sets init_args that Front3DDataset also takes, to other values."""
    cfg = yaml.safe_load(Path(M3D_CPU).read_text())["data"]["dataset"]["init_args"]
    shared = {k: v for k, v in cfg.items() if k in _defaults(Front3DDataset) and v != _defaults(Front3DDataset)[k]}
    assert {"num_surface_points", "num_sdf_points"} <= set(shared), shared


def test_class_path_on_the_command_line_starts_from_the_new_defaults():
    given = {"root": "/data/3dfront", "split": "split/train.json"}
    cfg = _resolved(["-c", M3D_CPU, "--data.dataset.class_path", FRONT3D,
                     "--data.dataset.init_args.root", given["root"], "--data.dataset.init_args.split", given["split"]])
    ds = cfg["data"]["init_args"]["dataset"]  # resolved data: {class_path, init_args} (subclass_mode_data)
    assert ds["class_path"] == FRONT3D
    _assert_fresh(ds["init_args"], Front3DDataset, given)  # num_surface_points 0, num_sdf_points 4096
    # Options outside the swapped part are untouched.
    assert cfg["data"]["init_args"]["batch_size"] == 2 and cfg["model"]["class_path"] == "recon3d.methods.m3d.M3DModule"


def test_class_path_in_a_later_config_file_starts_from_the_new_defaults(tmp_path):
    given = {"root": "/data/3dfront", "split": "split/val.json", "num_sdf_points": 512}
    override = tmp_path / "front3d.yaml"
    override.write_text(yaml.safe_dump({"data": {"dataset": {"class_path": FRONT3D, "init_args": given}}}))
    ds = _resolved(["-c", M3D_CPU, "-c", str(override)])["data"]["init_args"]["dataset"]
    _assert_fresh(ds["init_args"], Front3DDataset, given)


def test_same_class_keeps_earlier_init_args():
    """Overriding one init_arg (or restating the same class_path) keeps the rest of the config's values."""
    base = yaml.safe_load(Path(M3D_CPU).read_text())["data"]["dataset"]["init_args"]
    for extra in (["--data.dataset.init_args.num_objects", "5"],
                  ["--data.dataset.class_path", "recon3d.data.synthetic.SyntheticDataset", "--data.dataset.init_args.num_objects", "5"]):
        ds = _resolved(["-c", M3D_CPU, *extra])["data"]["init_args"]["dataset"]["init_args"]
        assert ds["num_objects"] == 5
        assert {k: ds[k] for k in base if k != "num_objects"} == {k: v for k, v in base.items() if k != "num_objects"}
    _assert_fresh(ds, SyntheticDataset, {**base, "num_objects": 5})


def test_nested_part_swap_resets_only_that_part():
    """gtr_cpu.yaml's ConvPatchEncoder {width: 96, patch_size: 8} -> VAEEncoder (which takes both): VAE defaults."""
    from recon3d.models.encoders import VAEEncoder

    gtr_cpu = str(ROOT / "configs" / "gtr_cpu.yaml")
    before = _resolved(["-c", gtr_cpu])["model"]["init_args"]
    assert before["encoder"]["init_args"]["width"] == 96
    after = _resolved(["-c", gtr_cpu, "--model.init_args.encoder.class_path", "recon3d.models.encoders.VAEEncoder"])["model"]["init_args"]
    assert after["encoder"]["class_path"] == "recon3d.models.encoders.VAEEncoder"
    _assert_fresh(after["encoder"]["init_args"], VAEEncoder, {})
    assert {k: v for k, v in after.items() if k != "encoder"} == {k: v for k, v in before.items() if k != "encoder"}
