"""Benchmarks stay runnable: every module imports and has ``main``; the cheap ones run a tiny case.

Speed is never asserted here (shared machines); this only catches API drift between the package
and ``benchmarks/`` (a benchmark that no longer runs is a benchmark nobody notices is broken).
"""

from __future__ import annotations

import importlib
import inspect

import pytest
from benchmarks.run_all import discover


@pytest.mark.parametrize("name", discover())
def test_benchmark_module_imports_and_has_main(name):
    mod = importlib.import_module(name)
    assert callable(getattr(mod, "main", None)), f"{name} has no main()"
    assert "quick" in inspect.signature(mod.main).parameters


def test_bench_m3d_trains_and_evaluates_both_variants(capsys):
    from benchmarks import bench_m3d

    bench_m3d.main(quick=True, steps=3)
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["m3d"], ["baseline"])}
    assert set(rows) == {"m3d", "baseline"}
    for cols in rows.values():
        assert all(c.lower() != "nan" for c in cols[1:]), cols


def test_bench_ssm_scan_table_runs(capsys, monkeypatch):
    from benchmarks import bench_ssm

    bench_ssm.bench_scan(quick=True)
    out = capsys.readouterr().out
    assert "fused_cpu" in out and " 1024 " in out


def test_bench_mesh_iou_grid_agrees_with_the_old_inside_test(capsys):
    from benchmarks import bench_mesh_iou

    bench_mesh_iou.main(quick=True)
    rows = [line for line in capsys.readouterr().out.splitlines() if "faces" in line]
    assert len(rows) == 3 and all(r.endswith("100.00%") for r in rows), rows
