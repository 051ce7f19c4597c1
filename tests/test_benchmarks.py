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


def test_bench_lgm_raster_matches_the_dense_compositor(capsys):
    from benchmarks import bench_lgm

    r = bench_lgm.bench_raster(splat=8, views=2, size=32, rows=4)
    assert r["gaussians"] == 2 * 8 * 8 and 0 < r["visible"] < 1  # some rays miss the sphere: transparent, culled
    # The tile rasteriser vs every-pixel-against-every-Gaussian compositing on the timed band: they
    # differ only by the tiles' 3-sigma cut-off (a depth tie would reorder colours: ~0.5 here).
    assert r["band_max_diff"] < 1e-2
    for m in (r["fwd"], r["fwd_bwd"]):
        assert m.seconds > 0 and m.peak_mb > 0
    bench_lgm._print_raster(r, "smoke")
    bench_lgm._print_boost("needs LGMModule/BoostModule (test)", 1, 1)
    out = capsys.readouterr().out
    assert "(b) rasterise smoke: 128 Gaussians" in out and "(d) LGM vs LGM + boost: skipped: needs" in out


def test_bench_lgm_pixel_aligned_gaussians_sit_on_the_sphere():
    import torch
    from benchmarks import bench_lgm

    from recon3d.models.lgm import lgm_orbit_cameras

    cams = lgm_orbit_cameras((0.0, 90.0, 180.0, 270.0), size=64)[None]
    g = bench_lgm.pixel_aligned_gaussians(cams, splat=16, sphere_radius=0.5)
    opaque = g.opacities[0] > 0.5
    r = g.means[0].norm(dim=-1)
    # Hits lie on the sphere up to the along-ray jitter (half a footprint, footprint = scale / 0.75 at most).
    foot = g.scales[0].amax(-1) / 0.75
    assert opaque.any() and (~opaque).any()
    assert torch.all((r[opaque] - 0.5).abs() <= 0.5 * foot[opaque] + 1e-5)
    assert torch.all(r[~opaque] > 0.5 - 1e-5)  # misses: the ray's closest approach lies outside


@pytest.mark.slow
def test_bench_lgm_meta_flop_count_equals_the_cpu_count():
    import torch
    from benchmarks import bench_lgm

    from recon3d.models.flops import flop_counter
    from recon3d.models.lgm import LGMNetwork, lgm_input_features, lgm_orbit_cameras

    cams = lgm_orbit_cameras((0.0, 180.0), size=32)[None]
    feats = lgm_input_features(torch.rand(1, 2, 3, 32, 32), cams)
    with torch.no_grad(), flop_counter() as fc:
        LGMNetwork("tiny", num_views=2).raw_from_features(feats)
    assert bench_lgm.forward_flops("tiny", 32, views=2) == fc.get_total_flops() > 0


@pytest.mark.slow
def test_bench_lgm_boost_comparison_runs(capsys):
    import math

    from benchmarks import bench_lgm

    r = bench_lgm.bench_boost(steps=2, extra=1, num_objects=6, num_test=2)
    assert not isinstance(r, str), r
    assert r["base_bit_identical"] and 0 < r["adapter_params"] < r["params"]
    for name in ("base", "lgm", "boost"):
        assert math.isfinite(r[name][1]["psnr"]), (name, r[name])
    bench_lgm._print_boost(r, 2, 1)
    assert "LGM+boost @ 2+1" in capsys.readouterr().out


def test_bench_flow_reports_every_sampler_configuration(capsys):
    import torch
    from benchmarks import bench_flow

    model = bench_flow.TinyDiT(width=16, blocks=1).eval()
    rows = bench_flow.bench_case("smoke", model, torch.randn(1, 8, 2, 2, 2), torch.randn(1, 2, 32), "cpu", repeats=1)
    assert [r["config"] for r in rows] == ["plain", "cfg", "cfg+rescale", "multidiff V=3 +cfg", "cfg+rescale+hook"]
    assert [r["evals"] for r in rows] == [1, 2, 2, 4, 2]
    assert all(r["overhead"] >= 0 and r["model"] > 0 and r["ratio"] == r["overhead"] / r["model"] for r in rows)
    assert "(smoke) one model evaluation" in capsys.readouterr().out


def test_bench_sparse_conv_and_attention_cases_run():
    import math

    import torch
    from benchmarks import bench_sparse

    class _Box(list):
        put = list.append

    threads = torch.get_num_threads()  # the benchmark sets its own thread counts
    try:
        r = bench_sparse.conv_case(12, 0.1, 8, threads=1, repeats=1, t_dense=1.0, spconv=False)
        assert r["voxels"] > 0 and all(r[k] > 0 for k in ("first", "ours", "ours_1t")) and math.isnan(r["spconv"])
        for variant in ("packed", "padded", "blockdiag"):
            box = _Box()
            bench_sparse._attention_child(variant, 256, 2, 8, 1, box)
            assert box[0]["voxels"] == 256 and box[0]["err"] < 1e-5 and sum(box[0]["lens"]) == 256
    finally:
        torch.set_num_threads(threads)
