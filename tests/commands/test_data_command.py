"""``recon3d data``: depth (tiny Depth Anything from a transformers config), synthetic, convert."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recon3d.cli import main as cli_main
from recon3d.data.formats.front3d import Front3DDataset
from tests.data.test_front3d import H, W, _tiny_depth_anything, write_front3d


@pytest.fixture(scope="module")
def depth_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("depth_anything")
    _tiny_depth_anything(path)
    return path


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cli_main(["data", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_depth_caches_front3d_fixture(tmp_path, depth_model, capsys):
    root, cache = tmp_path / "front3d", tmp_path / "cache"
    write_front3d(root)
    ds = Front3DDataset(str(root), "split.json", depth_dir=str(cache))
    rc, out, err = _run(["depth", "--model-dir", str(depth_model), "--out", str(cache), "--front3d-root", str(root),
                         "--split", "split.json", "--device", "cpu"], capsys)
    assert rc == 0, err
    assert "1 depth maps" in out and (cache / "test/rgb/000751_rgb_003848.npy").is_file()
    prior = ds.load_extras(0)["depth_prior"]
    assert prior.shape == (1, H, W) and np.isfinite(prior.numpy()).all()


def test_depth_caches_an_image_folder(tmp_path, depth_model, capsys):
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((20, 28, 3)) * 255).astype(np.uint8)).save(imgs / "a.png")
    Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(imgs / "sub/b.jpg")
    rc, out, err = _run(["depth", "--model-dir", str(depth_model), "--out", str(tmp_path / "c"), "--image-dir", str(imgs)], capsys)
    assert rc == 0, err
    assert np.load(tmp_path / "c/a.npy").shape == (20, 28) and np.load(tmp_path / "c/sub/b.npy").shape == (16, 16)


def test_depth_bad_input_is_one_line(tmp_path, capsys):
    rc, _, err = _run(["depth", "--model-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c"), str(tmp_path / "x.png")], capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("recon3d: error:")
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    rc, _, err = _run(["depth", "--model-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c"), str(img)], capsys)
    assert rc == 2 and "config.json missing" in err and err.count("\n") == 1
    rc, _, err = _run(["depth", "--model-dir", "m", "--out", "c"], capsys)
    assert rc == 2 and "exactly one source" in err


def test_synthetic_pregenerates_and_reports_time(tmp_path, capsys):
    args = ["synthetic", "--num-objects", "2", "--views", "2", "--resolution", "16", "--num-surface-points", "64",
            "--num-sdf-points", "64", "--mesh-resolution", "16", "--out", str(tmp_path)]
    rc, out, err = _run(args, capsys)
    assert rc == 0, err
    assert "2 generated" in out and " s" in out and len(list(tmp_path.rglob("*.npz"))) == 2
    rc, out, _ = _run(args, capsys)
    assert rc == 0 and "0 generated, 2 already cached" in out


@pytest.mark.parametrize("fmt,probe", [("blender", "transforms_train.json"), ("openlrm", "intrinsics.npy"),
                                       ("instantmesh", "cameras.npz"), ("gtr_views", "cam_001.txt")])
def test_convert_writes_each_format(tmp_path, fmt, probe, capsys):
    rc, out, err = _run(["convert", "--format", fmt, "--num-objects", "1", "--views", "2", "--resolution", "16",
                         "--num-surface-points", "64", "--num-sdf-points", "64", "--mesh-resolution", "16",
                         "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")], capsys)
    assert rc == 0, err
    assert f"1 objects written as {fmt}" in out
    assert list((tmp_path / "out").rglob(probe)), sorted(str(p) for p in (tmp_path / "out").rglob("*"))
    if fmt == "blender":
        from recon3d.data.formats import BlenderDataset

        ds = BlenderDataset(str(tmp_path / "out" / "synth_0_00000"))
        assert ds.load_views(0, [0, 1]).rgb.shape == (2, 3, 16, 16)
