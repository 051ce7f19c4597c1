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


@pytest.mark.slow  # ~21 s: trains both encoder variants
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


def test_bench_vggt_block_timings_fits_and_memory_child_run(capsys):
    import torch
    from benchmarks import bench_vggt

    # the exponent fits recover planted laws (the benchmark's conclusions rest on them)
    views = [2, 4, 8, 16, 32]
    assert bench_vggt.fit_exponent(views, [3e-4 * s**2 for s in views]) == pytest.approx(2.0)
    assert bench_vggt.fit_exponent(views, [5e-3 * s for s in views]) == pytest.approx(1.0)
    a, b = bench_vggt.fit_linear_quadratic(views, [2e-3 * s + 1e-4 * s * s for s in views])
    assert a == pytest.approx(2e-3) and b == pytest.approx(1e-4)
    threads = torch.get_num_threads()
    try:
        agg = bench_vggt.small_aggregator(width=16, heads=2, image=28, depth=4)
        rows = bench_vggt.time_blocks(agg, views=(2, 4), repeats=1)
        assert [r["tokens"] for r in rows] == [2 * 9, 4 * 9]  # 2x2 patches + camera + 4 registers per frame
        assert all(r[k] > 0 for r in rows for k in ("frame", "glob", "frame_attn", "glob_attn", "full"))
        fits = bench_vggt._print_blocks(rows)
        assert set(fits) >= {"frame", "glob", "full", "quadratic_share"}

        class _Box(list):
            put = list.append

        box = _Box()
        bench_vggt._memory_child(16, 2, 28, 4, 3, 1, box)
        # retained outputs: depth x [1, S, P, 2C] float32
        assert box[0]["views"] == 3 and box[0]["outputs_mb"] == pytest.approx(4 * 3 * 9 * 32 * 4 / 2**20)
    finally:
        torch.set_num_threads(threads)
    assert "global attn" in capsys.readouterr().out


def test_bench_mvboost_input_images_round_trip_the_dataset_views(tmp_path):
    import torch
    from benchmarks import bench_mvboost

    from recon3d.commands.pseudo_gt import list_images
    from recon3d.data.base import load_image
    from recon3d.data.synthetic import SyntheticDataset

    ds = SyntheticDataset(num_objects=2, views_per_object=1, resolution=16, num_surface_points=0, num_sdf_points=0,
                          mesh_resolution=0, cache_dir=str(tmp_path / "cache"))
    assert bench_mvboost.write_input_images(ds, [1, 0], tmp_path / "img") == 2
    items, failures = list_images(tmp_path / "img")
    assert [i for i, _ in items] == ds.object_ids() and not failures  # listed sorted by id
    for (_, path), idx in zip(items, (0, 1)):
        rgb, alpha = load_image(path)
        v = ds.load_views(idx, [0])
        # 8-bit PNG of the stored 8-bit views: equal to within one rounding step
        assert alpha is not None and torch.allclose(alpha, v.alpha[0], atol=0.5 / 255 + 1e-6)
        assert torch.allclose(rgb, v.rgb[0], atol=0.5 / 255 + 1e-6)


@pytest.mark.slow
def test_bench_mvboost_boosts_on_both_supervisions_and_times_the_builder(capsys):
    import math

    from benchmarks import bench_mvboost

    r = bench_mvboost.bench(num_objects=3, num_test=1, steps=1, gen_steps=2, boost=1, shard_size=1)
    assert r["num_inputs"] == 2 and r["build"].objects == 2 and r["build"].failures == 0
    assert len(r["build"].shards_written) == 2
    assert r["base_bit_identical"] == {"refined": True, "generated": True} and 0 < r["adapter_params"] < r["params"]
    assert r["gen_loss"] is not None and all(math.isfinite(x) for x in r["gen_loss"])
    for name in ("base", "refined", "generated"):
        assert all(math.isfinite(r[name][k]) for k in ("psnr", "ssim", "cd", "fscore")), (name, r[name])
    stages = r["build"].stage_seconds
    assert set(stages) == {"generate", "reconstruct+render", "refine"} and sum(stages.values()) <= r["build"].seconds
    bench_mvboost.report(r, 1, 2, 1)
    out = capsys.readouterr().out
    assert "+ boost on refined C↑^π @ 1" in out and "images/min" in out and "LPIPS" in out
