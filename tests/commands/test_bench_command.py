"""``recon3d bench``: finds the suite (checkout, installed copy, --benchmarks-dir), appends runs to
``<date>-<commit>.json``, ``--compare`` prints now/earlier ratios, bad files are one line.

A tiny suite is built per test: the real ``benchmarks/run_all.py`` next to two benchmarks whose
``main`` returns known numbers (and one that fails), so what lands in the JSON is known exactly.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from recon3d.cli import main as cli_main
from recon3d.commands import bench

REPO = Path(__file__).resolve().parents[2]

TINY = '''
def main(quick=False):
    return [{"config": "plain", "ratio": 2.0 if quick else 3.0, "evals": 1}, ("startup", 0.25)]
'''
OTHER = '''
def main(quick=False):
    return {"x": 1.5, "nested": {"y": 4}, "flag": True, "name": "ignored"}
'''
BOOM = '''
def main(quick=False):
    raise RuntimeError("planted failure")
'''


@pytest.fixture()
def suite(tmp_path) -> Path:
    d = tmp_path / "suite"
    d.mkdir()
    shutil.copy(REPO / "benchmarks" / "run_all.py", d / "run_all.py")
    (d / "__init__.py").write_text('"""tiny suite"""\n')
    (d / "bench_tiny.py").write_text(TINY)
    (d / "bench_other.py").write_text(OTHER)
    (d / "bench_zboom.py").write_text(BOOM)
    return d


def _run(argv, capsys):
    rc = cli_main(["bench", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_tiny_selection_writes_the_versioned_json_and_appends(tmp_path, suite, capsys):
    res = tmp_path / "res"
    rc, out, err = _run(["--benchmarks-dir", str(suite), "--results-dir", str(res), "-k", "tiny", "--quick"], capsys)
    assert rc == 0, err
    files = list(res.glob("*.json"))
    assert len(files) == 1
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    assert re.fullmatch(rf"{today}-v\d+\.\d+\.\d+\.json", files[0].name), files[0].name  # no git repo: the version
    assert f"results appended to {files[0]}" in out
    data = json.loads(files[0].read_text())
    assert data["format"] == "recon3d-bench" and len(data["runs"]) == 1
    run = data["runs"][0]
    assert run["quick"] is True and run["only"] == "tiny" and list(run["benchmarks"]) == ["bench_tiny"]
    b = run["benchmarks"]["bench_tiny"]
    assert b["status"] == "ok" and b["seconds"] >= 0
    assert b["metrics"] == {"plain.ratio": 2.0, "plain.evals": 1.0, "startup": 0.25}
    # the same day and commit: appended to the same file
    rc, _, _ = _run(["--benchmarks-dir", str(suite), "--results-dir", str(res), "-k", "other"], capsys)
    data = json.loads(files[0].read_text())
    assert rc == 0 and len(data["runs"]) == 2
    assert data["runs"][1]["benchmarks"]["bench_other"]["metrics"] == {"x": 1.5, "nested.y": 4.0}


def test_failures_are_recorded_and_the_exit_status_is_1(tmp_path, suite, capsys):
    rc, out, _ = _run(["--benchmarks-dir", str(suite), "--results-dir", str(tmp_path / "r")], capsys)
    assert rc == 1 and "2 ok, 1 failed" in out
    run = json.loads(next((tmp_path / "r").glob("*.json")).read_text())["runs"][0]
    assert run["benchmarks"]["bench_zboom"]["status"].startswith("FAILED (RuntimeError: planted failure")
    assert "benchmarks" not in sys.modules or "suite" not in str(getattr(sys.modules["benchmarks"], "__path__", ""))


def test_compare_prints_ratios_against_an_earlier_file(tmp_path, suite, capsys):
    res = tmp_path / "res"
    rc, _, _ = _run(["--benchmarks-dir", str(suite), "--results-dir", str(res), "-k", "tiny"], capsys)  # ratio 3.0
    assert rc == 0
    now_file = next(res.glob("*.json"))
    earlier = json.loads(now_file.read_text())
    b = earlier["runs"][0]["benchmarks"]["bench_tiny"]
    b["seconds"], b["metrics"]["plain.ratio"], b["metrics"]["startup"] = 4.0, 1.5, 0.5
    earlier_file = tmp_path / "earlier.json"
    earlier_file.write_text(json.dumps(earlier))
    rc, out, err = _run(["--benchmarks-dir", str(suite), "--results-dir", str(res), "-k", "tiny", "--compare", str(earlier_file)], capsys)
    assert rc == 0, err
    table = out[out.index("=== compare with"):]
    rows = {ln.split()[0] if not ln.startswith(" ") else ln.split()[0]: ln.split() for ln in table.splitlines()[2:] if ln.strip()}
    assert rows["plain.ratio"][-1] == "2.000x"  # 3.0 now / 1.5 earlier
    assert rows["startup"][-1] == "0.500x"  # 0.25 / 0.5
    wall = rows["bench_tiny"]
    assert wall[1:3] == ["wall", "s"] and float(wall[-1].rstrip("x")) == pytest.approx(float(wall[-2]) / 4.0, rel=2e-3, abs=2e-3)
    # two files, nothing run
    rc, out, _ = _run(["--compare", str(earlier_file), "--current", str(now_file)], capsys)
    assert rc == 0 and "2.000x" in out and "=== bench_tiny" not in out


@pytest.mark.parametrize("content,want", [(None, "file not found"), ("{not json", "cannot parse JSON"),
                                          ('{"format": "other", "runs": []}', "not a recon3d bench results file")])
def test_missing_or_garbled_compare_file_is_one_line_exit_2(tmp_path, suite, capsys, content, want):
    f = tmp_path / "earlier.json"
    if content is not None:
        f.write_text(content)
    rc, out, err = _run(["--benchmarks-dir", str(suite), "--results-dir", str(tmp_path / "r"), "--compare", str(f)], capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("recon3d: error:") and str(f) in err and want in err, err
    assert "=== bench_" not in out and not (tmp_path / "r").exists()  # checked before anything ran


def test_installed_copy_is_found_without_a_checkout(tmp_path, suite, capsys, monkeypatch):
    monkeypatch.setattr(bench, "CHECKOUT_BENCHMARKS", tmp_path / "no-checkout" / "benchmarks")
    monkeypatch.setattr(bench, "PACKAGED_BENCHMARKS", suite)
    monkeypatch.chdir(tmp_path)
    rc, out, _ = _run(["--list"], capsys)
    assert rc == 0 and f"suite in {suite} (installed)" in out and "bench_tiny" in out
    rc, out, _ = _run(["-k", "other"], capsys)
    assert rc == 0 and len(list((tmp_path / "benchmarks" / "results").glob("*.json"))) == 1
    monkeypatch.setattr(bench, "PACKAGED_BENCHMARKS", tmp_path / "nothing")
    rc, _, err = _run(["-k", "other"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "no benchmark suite found" in err


def test_checkout_suite_is_the_repositorys_benchmarks(capsys):
    from benchmarks.run_all import discover

    rc, out, _ = _run(["--list"], capsys)
    assert rc == 0 and f"suite in {REPO / 'benchmarks'} (checkout)" in out
    assert [ln.strip() for ln in out.splitlines()[1:]] == [n.rsplit(".", 1)[-1] for n in discover()]


@pytest.mark.slow
def test_the_wheel_ships_the_suite_and_its_configs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("src", "benchmarks", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(REPO / name, src / name)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "wh")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    names = set(zipfile.ZipFile(next((tmp_path / "wh").glob("*.whl"))).namelist())
    for f in (REPO / "benchmarks").glob("*.py"):
        assert f"recon3d/benchmarks/{f.name}" in names
    assert "recon3d/configs/gtr_cpu.yaml" in names and "recon3d/commands/bench.py" in names
