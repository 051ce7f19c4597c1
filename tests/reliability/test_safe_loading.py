"""Safe loading: weights-only everywhere; a checkpoint carrying pickled code is refused (and its
code never runs) unless the user opts in explicitly; checkpoint writes are atomic."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from recon3d.errors import CheckpointError
from recon3d.utils.checkpoint import load_state_dict_file
from recon3d.utils.ckpt_io import AtomicCheckpointIO, atomic_torch_save, write_atomically
from tests.reliability.corpus import _Planted
from tests.reliability.harness import REPO


def _plant(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Planted(str(marker))}, path)
    return path, marker


def test_pickled_code_is_refused_and_not_executed(tmp_path):
    path, marker = _plant(tmp_path)
    for load in (lambda: load_state_dict_file(path), lambda: AtomicCheckpointIO().load_checkpoint(path)):
        with pytest.raises(CheckpointError, match="refused to load.*allow_pickle"):
            load()
    assert not marker.exists()


def test_explicit_opt_in_loads_it(tmp_path):
    path, marker = _plant(tmp_path)
    AtomicCheckpointIO(allow_pickle=True).load_checkpoint(path)
    assert marker.exists()  # the opt-in really unpickles (and so runs the file's code)


def test_cli_refuses_then_accepts_with_flag(tmp_path, synthetic_cache):
    from tests.reliability.corpus import _cli

    path, marker = _plant(tmp_path)
    base = ["fit", "-c", str(REPO / "configs/toy.yaml"), "--data.dataset.init_args.cache_dir", str(synthetic_cache),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "out"), "--ckpt_path", str(path)]
    o = _cli(base)
    assert o.rc == 2 and len(o.error_lines) == 1 and "refused to load" in o.error_lines[0] and not o.traceback
    assert not marker.exists()
    o = _cli(base + ["--allow_pickle", "true"])
    assert marker.exists()  # now it was unpickled; the file is still not a toy checkpoint
    assert o.rc == 2 and len(o.error_lines) == 1 and not o.traceback


def test_every_torch_load_in_the_package_is_weights_only():
    offenders = []
    for f in (REPO / "src" / "recon3d").rglob("*.py"):
        for m in re.finditer(r"torch\.load\((.*?)\)\s*$", f.read_text(), flags=re.M | re.S):
            call = f.read_text()[m.start(): m.start() + 400].split("\n\n")[0]
            if "weights_only" not in call:
                offenders.append(str(f.relative_to(REPO)))
    assert not offenders, offenders


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"v": 1}, target)

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomically(target, boom)
    assert torch.load(target, weights_only=True) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
