"""``recon3d data pseudo-gt`` (MVBoost Algorithm 1 over an image folder) and the dataset reading its shards.

Tiny random-weight models: recon3d's pixel-space multi-view diffusion (4 views, 16², 3 DDIM steps) as
the generator and LGM tiny as the reconstructor. Independent checks recompute Algorithm 1 for an object
directly with the models (generate with the object's seed, LGM on the generated views, render, refine).
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from recon3d.commands.pseudo_gt import PseudoGTBuilder, condition_image, default_input_views, list_images
from recon3d.data.batch import Batch, Views
from recon3d.data.datamodule import ReconDataModule
from recon3d.data.pseudo_gt import MANIFEST_NAME, PseudoGTDataset, read_manifest, shard_name
from recon3d.errors import ConfigError, DataError
from recon3d.representations.reconstruction import object_seed

REPO = Path(__file__).resolve().parents[2]
R = 16


@pytest.fixture(scope="module")
def models():
    from recon3d.methods.lgm import LGMModule
    from recon3d.models.lgm import LGMNetwork
    from recon3d.models.multiview.diffusion import MultiViewDiffusion

    torch.manual_seed(0)
    gen = MultiViewDiffusion(num_views=4, resolution=R, azimuths=[0.0, 90.0, 180.0, 270.0], block_out_channels=(16, 32),
                             attention_heads=2, cross_attention_dim=32, num_inference_steps=3).eval()
    rec = LGMModule(network=LGMNetwork(preset="tiny", num_views=4), lambda_lpips=0.0, lambda_mask=0.0, augment=False).eval()
    return gen, rec


def _images(folder: Path, n: int, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        a = np.zeros((20, 24, 4), np.uint8)  # non-square RGBA: padded to a square on white
        a[..., :3] = rng.integers(0, 256, 3)
        a[4:16, 6:18, 3] = 255
        Image.fromarray(a).save(folder / f"obj{i}.png")
        names.append(f"obj{i}")
    return names


def _builder(models, out: Path, strength: float = 0.5, shard_size: int = 2, **kw) -> PseudoGTBuilder:
    gen, rec = models
    return PseudoGTBuilder(gen, rec, out, strength, [0, 1, 2, 3], None, shard_size, seed=3, batch_size=2,
                           generator_identity={"fingerprint": "g"}, reconstructor_identity={"fingerprint": "r"}, **kw)


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard_*.safetensors"))}


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    """A 4-image set, shard size 2, built once in one process."""
    d = tmp_path_factory.mktemp("pgt_ref")
    ids = _images(d / "imgs", 4)
    s = _builder(models, d / "out").build(d / "imgs", progress=False)
    return d, ids, s


def test_builds_a_four_image_set_that_is_algorithm_1(models, reference):
    d, ids, s = reference
    gen, rec = models
    m = read_manifest(d / "out")
    assert m["complete"] and m["num_shards"] == 2 and m["num_objects"] == 4 and m["num_failures"] == 0
    assert [x for sh in m["shards"] for x in sh["ids"]] == ids and s.shards_written == [0, 1]
    assert m["strength"] == 0.5 and m["seed"] == 3 and m["input_views"] == [0, 1, 2, 3]
    assert m["shards"][1]["seeds"] == [object_seed(i, 3) for i in ids[2:]]
    t = load_file(str(d / "out" / shard_name(1)))
    assert t["generated"].shape == (2, 4, 3, R, R) and t["generated"].dtype == torch.uint8 and t["refined"].shape == (2, 4, 3, R, R)
    # Independent recomputation of object 2 (alone, not in its shard's batch): generate with its seed,
    # LGM on the four generated views, render at the generator's cameras, refine with the same generator.
    oid = ids[2]
    cond = condition_image(d / "imgs" / f"{oid}.png", gen)[None]
    g = torch.Generator().manual_seed(object_seed(oid, 3))
    with torch.no_grad():
        coarse = gen.generate(cond, generator=[g])
        views = Views(coarse.images, coarse.cameras)
        r = rec.reconstruct(Batch([oid], views, views, background=torch.ones(1, 3)))
        render = rec.render_reconstruction(r, coarse.cameras).rgb.clamp(0, 1)
        refined = gen.refine(Views(render, coarse.cameras), cond, 0.5, generator=[g])
    q = lambda x: (x.clamp(0, 1) * 255).round()  # noqa: E731
    assert (t["generated"][0].float() - q(coarse.images[0])).abs().max() <= 1  # batch-of-2 vs alone: rounding only
    assert (t["refined"][0].float() - q(refined.images[0])).abs().max() <= 1
    assert (t["image"][0].float() - q(cond[0])).abs().max() == 0
    torch.testing.assert_close(t["c2w"][0], coarse.cameras.c2w[0])
    # the refinement did something, and it is not the generated views back
    assert (t["refined"].float() - t["generated"].float()).abs().mean() > 5


def test_strength_zero_supervision_is_the_reconstructions_render(models, tmp_path):
    """s = 0 keeps no step: C↑^π is x^π, the render of LGM's reconstruction (pixel-space generator)."""
    gen, rec = models
    ids = _images(tmp_path / "imgs", 1)
    _builder(models, tmp_path / "out", strength=0.0).build(tmp_path / "imgs", progress=False)
    t = load_file(str(tmp_path / "out" / shard_name(0)))
    cams = gen.cameras(1)
    views = Views(t["generated"].float() / 255, cams)
    with torch.no_grad():
        render = rec.render_reconstruction(rec.reconstruct(Batch(ids, views, views, background=torch.ones(1, 3))), cams).rgb
    # LGM saw the float views, not their 8-bit copy: a few levels of difference at most
    assert (t["refined"].float() - (render.clamp(0, 1) * 255).round()).abs().mean() < 2.0


def test_kill_between_shards_then_restart_is_byte_identical_and_redoes_nothing(models, reference, tmp_path):
    d, ids, _ = reference
    _images(tmp_path / "imgs", 4)
    out = tmp_path / "out"

    def kill(k):
        if k == 0:
            raise KeyboardInterrupt("killed after shard 0")

    with pytest.raises(KeyboardInterrupt):
        _builder(models, out, on_shard_written=kill).build(tmp_path / "imgs", progress=False)
    m = read_manifest(out)
    assert [sh["index"] for sh in m["shards"]] == [0] and not m["complete"]  # only completed shards are listed
    assert len(PseudoGTDataset(str(out))) == 2
    # a half-written shard 1 left by the kill: a hidden temporary, never listed or read
    (out / f".{shard_name(1)}.abc123.tmp").write_bytes(b"half a shard")
    mtime0 = (out / shard_name(0)).stat().st_mtime_ns
    gen, rec = models
    calls = []
    orig = gen.generate
    gen.generate = lambda image, generator=None: (calls.append(image.shape[0]), orig(image, generator))[1]
    try:
        s = _builder(models, out).build(tmp_path / "imgs", progress=False)
    finally:
        del gen.generate
    assert s.shards_skipped == [0] and s.shards_written == [1] and sum(calls) == 2  # shard 0 not redone
    assert (out / shard_name(0)).stat().st_mtime_ns == mtime0
    assert not list(out.glob(".shard_*"))
    assert _shard_bytes(out) == _shard_bytes(d / "out")
    assert read_manifest(out)["complete"]


def test_rank_split_covers_every_image_exactly_once(models, reference, tmp_path):
    d, ids, _ = reference
    _images(tmp_path / "imgs", 4)
    out = tmp_path / "out"
    s0 = _builder(models, out, shard_size=1).build(tmp_path / "imgs", rank=0, world_size=2, progress=False)
    assert s0.shards_written == [0, 2] and not read_manifest(out)["complete"]
    s1 = _builder(models, out, shard_size=1).build(tmp_path / "imgs", rank=1, world_size=2, progress=False)
    assert s1.shards_written == [1, 3]
    m = read_manifest(out)
    listed = [x for sh in m["shards"] for x in sh["ids"]]
    assert m["complete"] and sorted(listed) == sorted(ids) and len(listed) == len(set(listed)) == 4
    assert [sh["rank"] for sh in m["shards"]] == [0, 1, 0, 1]
    assert sorted(PseudoGTDataset(str(out)).object_ids()) == sorted(ids)


def test_bad_images_are_counted_and_listed_never_fatal(models, tmp_path):
    imgs = tmp_path / "imgs"
    _images(imgs, 2)
    (imgs / "readme.txt").write_text("not an image")
    (imgs / "fake.png").write_text("text with an image suffix")
    data = (imgs / "obj0.png").read_bytes()
    (imgs / "truncated.png").write_bytes(data[: len(data) // 2])
    s = _builder(models, tmp_path / "out", shard_size=8).build(imgs, progress=False)
    m = read_manifest(tmp_path / "out")
    reasons = {f["id"]: f["reason"] for f in m["failures"]}
    assert set(reasons) == {"readme", "fake", "truncated"} and m["num_failures"] == 3 and s.failures == 2
    assert "not an image file" in reasons["readme"] and "cannot decode image" in reasons["fake"]
    assert "truncated.png" in reasons["truncated"] and all("\n" not in r for r in reasons.values())
    assert m["num_objects"] == 2 and PseudoGTDataset(str(tmp_path / "out")).object_ids() == ["obj0", "obj1"]


def test_resume_refuses_other_settings(models, reference):
    d, _, _ = reference
    with pytest.raises(ConfigError, match=r"built with strength 0.5; this run asks 0.9"):
        _builder(models, d / "out", strength=0.9).build(d / "imgs", progress=False)


def test_wrong_view_count_for_the_reconstructor_is_one_line(models):
    gen, _ = models
    assert default_input_views(gen, 4) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match=r"the generator makes 4 views per image, the reconstruction model takes 6; give --input-views") as e:
        default_input_views(gen, 6)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"--input-views 0,1: expected 3 distinct indices of the generator's 4 views"):
        default_input_views(gen, 3, [0, 1])
    assert default_input_views(gen, 2, [0, 2]) == [0, 2]


def _cli(argv):
    from recon3d.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, [ln for ln in err.getvalue().splitlines() if ln.strip()]


@pytest.mark.parametrize("s", ["1.5", "-0.1", "nan"])
def test_strength_outside_unit_interval_exits_2_with_one_line(tmp_path, s):
    rc, lines = _cli(["data", "pseudo-gt", "--images", str(tmp_path), "--out", str(tmp_path / "o"), "--strength", s,
                      "--generator", "g.yaml", "--reconstructor", "r.yaml"])
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("recon3d: error: --strength: expected a number in [0, 1]")
    assert not (tmp_path / "o").exists()


def test_dataset_pairs_generated_inputs_with_refined_targets(reference):
    d, ids, _ = reference
    out = d / "out"
    ds = PseudoGTDataset(str(out))
    t = load_file(str(out / shard_name(0)))
    dm = ReconDataModule(ds, num_val_objects=0, num_test_objects=0, num_input_views=4, num_target_views=0, supervise_inputs=True,
                         with_geometry=False, batch_size=4, train_view_sampling="fixed", seed=0)
    b = next(iter(dm.loader("train")))
    k = b.object_ids.index(ids[0])
    torch.testing.assert_close(b.inputs.images[k], t["generated"][0].float() / 255)
    torch.testing.assert_close(b.targets.images[k], t["refined"][0].float() / 255)
    assert b.targets.cameras.batch_shape == (4, 4) and b.inputs.masks is None
    torch.testing.assert_close(b.targets.cameras.c2w[k], t["c2w"][0])
    # Table 4's "original": the raw generated views supervise; §3.4: the input image as input view 0
    raw = PseudoGTDataset(str(out), supervision="generated", image_as_input_view=True).load_views(0, [0, 1, 4, 5])
    torch.testing.assert_close(raw.rgb[0], t["image"][0].float() / 255)
    torch.testing.assert_close(raw.rgb[1:], torch.stack([t["generated"][0, 1], t["generated"][0, 0], t["generated"][0, 1]]).float() / 255)
    with pytest.raises(ConfigError, match=r"num_input_views: the pseudo-ground-truth set feeds the reconstruction model 4 views"):
        ds.choose_views(0, 0, 2, 0, "fixed", True, torch.Generator())
    with pytest.raises(ConfigError, match=r"refined at strength 0.5, the config expects 0.95"):
        PseudoGTDataset(str(out), strength=0.95)


def test_dataset_verifies_shards(reference, tmp_path):
    import shutil

    d, _, _ = reference
    out = tmp_path / "copy"
    shutil.copytree(d / "out", out)
    p = out / shard_name(1)
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF  # same size, other content
    p.write_bytes(bytes(data))
    ds = PseudoGTDataset(str(out))
    ds.load_views(0, [0])  # shard 0 is fine
    with pytest.raises(DataError, match=r"shard_00001.safetensors: SHA-256 differs from manifest.json"):
        ds.load_views(2, [0])
    p.write_bytes(bytes(data[:-10]))
    with pytest.raises(DataError, match=r"bytes, the manifest records"):
        PseudoGTDataset(str(out))
    with pytest.raises(DataError, match=r"manifest.json: not found"):
        PseudoGTDataset(str(tmp_path))
    (out / MANIFEST_NAME).unlink()
    with pytest.raises(ConfigError, match=r"give root"):
        PseudoGTDataset(None)


def test_listing_is_recursive_sorted_and_ids_are_relative_paths(tmp_path):
    (tmp_path / "b").mkdir()
    for rel in ("b/z.png", "a.png", "b/a.jpg", "a.jpg", ".hidden.png"):
        (tmp_path / rel).write_bytes(b"x")
    items, failures = list_images(tmp_path)
    assert [i for i, _ in items] == ["a", "b/a", "b/z"]
    assert [f["id"] for f in failures] == ["a"] and "also a.jpg" in failures[0]["reason"]


@pytest.mark.slow
def test_full_cpu_pipeline_image_folder_to_boosted_lgm_ply(tmp_path):
    """Image folder → `recon3d data pseudo-gt` → `recon3d fit` (BoostModule over LGM, configs/mvboost_cpu.yaml
    at test size) on the pseudo-GT set → `recon3d export` → Gaussians .ply that plyfile parses."""
    from plyfile import PlyData

    _images(tmp_path / "imgs", 6)
    exe = [sys.executable, "-m", "recon3d.cli"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore"}
    build = ["data", "pseudo-gt", "--images", "imgs", "--out", "pgt", "--strength", "0.95", "--shard-size", "4",
             "--generator", str(REPO / "configs/mv_diffusion_cpu.yaml"), "--generator", str(REPO / "configs/mv_diffusion/tiny.yaml"),
             "--reconstructor", str(REPO / "configs/lgm_cpu.yaml"), "--reconstructor", str(REPO / "configs/lgm/reliability.yaml")]
    p = subprocess.run(exe + build, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "6 objects, 0 failures" in p.stdout and read_manifest(tmp_path / "pgt")["complete"]
    # the test-size overlay, reading the built set instead of its synthetic stand-in
    (tmp_path / "on_pgt.yaml").write_text("data:\n  dataset:\n    class_path: recon3d.data.pseudo_gt.PseudoGTDataset\n"
                                          "    init_args: {root: pgt, synthetic: null, strength: 0.95}\n")
    cfg = ["-c", str(REPO / "configs/mvboost_cpu.yaml"), "-c", str(REPO / "configs/mvboost/reliability.yaml"), "-c", "on_pgt.yaml"]
    fit = ["fit", *cfg, "--trainer.logger.init_args.save_dir", "runs", "--trainer.max_epochs", "1"]
    p = subprocess.run(exe + fit, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = tmp_path / "runs" / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and (tmp_path / "runs" / "run" / "adapters.safetensors").is_file()
    exp = ["export", *cfg, "--ckpt", str(ckpt), "--out", "exp", "--", "--data.dataset.init_args.image_as_input_view", "true",
           "--model.init_args.merge_at_inference", "true"]
    p = subprocess.run(exe + exp, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    plys = sorted((tmp_path / "exp").rglob("*.ply"))
    assert plys, p.stdout
    v = PlyData.read(str(plys[0]))["vertex"]
    assert len(v) > 0 and {"x", "y", "z", "opacity"} <= set(v.data.dtype.names)
    assert np.isfinite(np.stack([v["x"], v["y"], v["z"]])).all()


def test_era3d_generator_feeds_lgm_its_front_right_back_left_and_all_six_supervise(models, tmp_path):
    """Era3D (tiny pipeline in the released layout, random weights): LGM takes views 0, 2, 3, 4 of the
    six orthographic views; the paper-scale data settings (4 inputs + 2 targets, supervise_inputs)
    make all six refined views the targets (supplementary §6)."""
    from recon3d.models.era3d.pipeline import Era3DGenerator
    from tests.models.era3d.test_era3d_pipeline import _components

    gen = Era3DGenerator(**_components(), num_inference_steps=2).eval()
    _, rec = models
    views = default_input_views(gen, 4)
    assert views == [0, 2, 3, 4]
    _images(tmp_path / "imgs", 2)
    PseudoGTBuilder(gen, rec, tmp_path / "out", 0.95, views, None, 2).build(tmp_path / "imgs", progress=False)
    ds = PseudoGTDataset(str(tmp_path / "out"))
    assert ds.num_gen_views == 6 and ds.input_views == [0, 2, 3, 4]
    inputs, targets = ds.choose_views(0, 0, 4, 2, "fixed", True, torch.Generator())
    assert inputs == [0, 2, 3, 4] and sorted(targets) == [6, 7, 8, 9, 10, 11]
    raw = ds.load_views(0, inputs)
    assert raw.cameras.is_orthographic and raw.rgb.shape == (4, 3, gen.resolution, gen.resolution)
    torch.testing.assert_close(raw.cameras.c2w, gen.cameras(1).c2w[0, inputs])
