"""Every YAML under configs/ parses through the real CLI (``recon3d fit ... --print_config``).

Composition rule: a file in ``configs/<name>/`` is an override of ``configs/<name>.yaml`` (or of
``configs/gtr_cpu.yaml`` when no such base exists, e.g. ``configs/trainer/``); top-level files
are complete configs. Suite files of ``recon3d compare`` (a mapping with ``entries:``, in
``configs/compare/``) are not LightningCLI configs: ``tests/commands/test_compare.py`` loads them.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from recon3d.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "entries" not in (yaml.safe_load(p.read_text()) or {}))


def _stack(path: Path) -> list[str]:
    rel = path.relative_to(ROOT / "configs")
    if len(rel.parts) == 1:
        return [str(path)]
    base = ROOT / "configs" / f"{rel.parts[0]}.yaml"
    return [str(base if base.exists() else ROOT / "configs" / "gtr_cpu.yaml"), str(path)]


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_config_parses(path, capsys):
    args = ["fit"]
    for cfg in _stack(path):
        args += ["-c", cfg]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(args + ["--print_config"])
    assert exit_.value.code in (0, None), capsys.readouterr().err
    resolved = yaml.safe_load(out.getvalue())
    assert resolved["model"]["class_path"].startswith("recon3d.methods.")
    # `data:` resolves to {class_path, init_args} (subclass_mode_data); the YAMLs give init_args only.
    assert resolved["data"]["class_path"].startswith("recon3d.")
    assert "dataset" in resolved["data"]["init_args"]


def test_unknown_key_is_one_line_error(capsys):
    code = main(["fit", "-c", str(ROOT / "configs" / "gtr_cpu.yaml"), "--model.init_args.no_such_key", "1", "--print_config"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("recon3d: error:") and len(err.splitlines()) == 1
    assert "no_such_key" in err and "Traceback" not in err
