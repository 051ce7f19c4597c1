"""The CLI's datamodule is swappable by class_path (issue 14 item 4: ``subclass_mode_data``).

Before, ``--data.class_path`` was "unrecognized": every method had to use ``ReconDataModule`` as
it is. Now ``data:`` takes ``class_path`` + ``init_args``; a ``data:`` block of plain init_args
(every YAML in configs/) still builds ``ReconDataModule``.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from recon3d.cli import main, run_lightning_cli
from recon3d.data.datamodule import ReconDataModule

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs" / "toy.yaml")
HERE = f"{__name__}.TaggedDataModule"


class TaggedDataModule(ReconDataModule):
    """A datamodule subclass with one option of its own (what a method's datamodule would add)."""

    def __init__(self, *args, tag: str = "none", **kwargs):
        super().__init__(*args, **kwargs)
        self.tag = tag


def _resolved(args: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(["fit", *args, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(out.getvalue())["data"]


def test_plain_data_block_is_recon_datamodule():
    raw = yaml.safe_load(Path(TOY).read_text())["data"]
    assert "class_path" not in raw  # the premise: the YAML gives init_args only
    data = _resolved(["-c", TOY, "--data.batch_size", "3"])
    assert data["class_path"] == "recon3d.data.datamodule.ReconDataModule"
    assert data["init_args"]["batch_size"] == 3
    assert data["init_args"]["num_input_views"] == raw["num_input_views"]
    assert data["init_args"]["dataset"]["init_args"]["num_objects"] == raw["dataset"]["init_args"]["num_objects"]
    cli = run_lightning_cli(["-c", TOY], run=False)
    assert type(cli.datamodule) is ReconDataModule


def test_class_path_in_a_config_file_builds_the_subclass(tmp_path):
    raw = yaml.safe_load(Path(TOY).read_text())["data"]
    override = tmp_path / "data.yaml"
    override.write_text(yaml.safe_dump({"data": {"class_path": HERE, "init_args": {**raw, "tag": "lgm"}}}))
    data = _resolved(["-c", TOY, "-c", str(override), "--data.init_args.batch_size", "1"])
    assert data["class_path"] == HERE and data["init_args"]["tag"] == "lgm" and data["init_args"]["batch_size"] == 1
    cli = run_lightning_cli(["-c", TOY, "-c", str(override), "--data.tag", "era3d"], run=False)
    assert type(cli.datamodule) is TaggedDataModule and cli.datamodule.tag == "era3d"
    assert cli.datamodule.num_input_views == raw["num_input_views"]
    assert len(cli.datamodule.dataset) == raw["dataset"]["init_args"]["num_objects"]


def test_class_path_on_the_command_line_starts_from_the_new_class(tmp_path):
    # The same rule as every part (tests/test_cli_class_change.py): the previous class's init_args
    # are dropped, so the new class's options are its defaults unless given after it.
    data = _resolved(["-c", TOY, "--data.class_path", HERE, "--data.init_args.tag", "x", "--data.init_args.num_input_views", "1"])
    assert data["class_path"] == HERE and data["init_args"]["tag"] == "x" and data["init_args"]["num_input_views"] == 1
    assert data["init_args"]["batch_size"] == 2 and data["init_args"]["dataset"] is None  # defaults


def test_bad_data_class_is_one_line(capsys):
    for bad in (["--data.class_path", "recon3d.no_such_module.DataModule"], ["--data.no_such_option", "1"],
                ["--data.class_path", "recon3d.methods.toy.ToyTriplaneModule"]):
        code = main(["fit", "-c", TOY, *bad, "--print_config"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("recon3d: error:") and len(err.splitlines()) == 1, err
