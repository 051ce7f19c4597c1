"""Readers and writers of the public render formats (issue 2 part 6).

Each reader is checked on a fixture written by hand in the raw upstream format (a known camera
whose OpenCV pose is worked out here), and each writer → reader pair round-trips random RGBA
views and orbit cameras.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from recon3d.data import orbit_cameras
from recon3d.data.cameras import Cameras
from recon3d.data.formats import (
    BlenderDataset,
    GTRViewsDataset,
    InstantMeshDataset,
    OpenLRMDataset,
    write_blender,
    write_gtr_views,
    write_instantmesh,
    write_openlrm,
)
from recon3d.errors import ShapeError

FLIP = np.diag([1.0, -1.0, -1.0, 1.0])
PIX_TOL = 0.5 / 255 + 1e-6


def _png(path, h, w, channels=4, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def _project(cams: Cameras, pts):
    uv, z = cams.project(torch.as_tensor(pts, dtype=torch.float32).expand(len(cams), -1, 3))
    return uv, z


def _gl_lookat_zup(eye):
    """OpenGL c2w looking at the origin with +Z up (as InstantMesh's center_looking_at_camera_pose)."""
    eye = np.asarray(eye, float)
    z = eye / np.linalg.norm(eye)
    x = np.cross([0.0, 0.0, 1.0], z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = x, y, z, eye
    return m


def _check_upright_zup(cams: Cameras):
    """The origin projects to the principal point in front; +Z (up) goes up the image."""
    uv, z = _project(cams, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.3]])
    K = cams.K
    assert (z > 0).all()
    torch.testing.assert_close(uv[:, 0], K[:, :2, 2], atol=1e-4, rtol=0)
    assert (uv[:, 1, 1] < K[:, 1, 2] - 1e-2).all()


# =============================================================================== hand-written fixtures
def test_blender_handwritten_transforms_json(tmp_path):
    obj = tmp_path / "lego"
    gl = _gl_lookat_zup([0.0, -3.0, 1.0])
    angle = 0.6911112070083618
    img0 = _png(obj / "train" / "r_0.png", 6, 8, seed=1)
    _png(obj / "train" / "r_1.png", 6, 8, seed=2)
    (obj / "transforms_train.json").write_text(json.dumps({
        "camera_angle_x": angle,
        "frames": [
            {"file_path": "./train/r_0", "rotation": 0.0, "transform_matrix": gl.tolist()},
            {"file_path": "train/r_1.png", "transform_matrix": gl[:3].tolist(), "fl_x": 9.0, "cy": 2.5},
        ],
    }))
    ds = BlenderDataset(str(obj), split="train")
    assert ds.object_ids() == ["lego"] and len(ds) == 1 and ds.num_views(0) == 2
    v = ds.load_views(0, [0, 1])
    assert v.rgb.shape == (2, 3, 6, 8) and v.alpha.shape == (2, 1, 6, 8)
    np.testing.assert_allclose(v.rgb[0].permute(1, 2, 0).numpy(), img0[..., :3] / 255.0, atol=1e-6)
    np.testing.assert_allclose(v.alpha[0, 0].numpy(), img0[..., 3] / 255.0, atol=1e-6)
    want = gl @ FLIP
    np.testing.assert_allclose(v.cameras.c2w[0].numpy(), want, atol=1e-6)
    np.testing.assert_allclose(v.cameras.c2w[1].numpy(), want, atol=1e-6)
    f = 0.5 * 8 / math.tan(angle / 2)
    np.testing.assert_allclose(v.cameras.K[0].numpy(), [[f, 0, 4], [0, f, 3], [0, 0, 1]], rtol=1e-6)
    np.testing.assert_allclose(v.cameras.K[1].numpy(), [[9, 0, 4], [0, 9, 2.5], [0, 0, 1]], rtol=1e-6)
    assert (v.cameras.width, v.cameras.height) == (8, 6)
    _check_upright_zup(v.cameras[:1])


def test_blender_split_fallback_and_many_objects(tmp_path):
    for name in ("b", "a"):
        obj = tmp_path / name
        _png(obj / "img.png", 4, 4, channels=3)
        (obj / "transforms.json").write_text(json.dumps({
            "camera_angle_x": 1.0, "w": 4, "h": 4,
            "frames": [{"file_path": "img.png", "transform_matrix": _gl_lookat_zup([2, 0, 0]).tolist()}],
        }))
    (tmp_path / "not_an_object").mkdir()
    ds = BlenderDataset(str(tmp_path), split="val")  # no transforms_val.json: transforms.json is used
    assert ds.object_ids() == ["a", "b"]
    v = ds[1]
    assert v.alpha is None and v.rgb.shape == (1, 3, 4, 4)
    _check_upright_zup(v.cameras)


def test_blender_mask_path_and_scale(tmp_path):
    obj = tmp_path / "o"
    _png(obj / "im.png", 4, 4, channels=3)
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(obj / "m.png")
    gl = _gl_lookat_zup([2, 0, 0])
    (obj / "transforms_train.json").write_text(json.dumps({
        "fl_x": 5, "frames": [{"file_path": "im.png", "mask_path": "m.png", "transform_matrix": gl.tolist()}],
    }))
    v = BlenderDataset(str(obj), scale=0.5).load_views(0, [0])
    assert v.alpha.shape == (1, 1, 4, 4) and float(v.alpha.min()) == 1.0
    np.testing.assert_allclose(v.cameras.centers[0].numpy(), [1.0, 0, 0], atol=1e-6)


def test_openlrm_handwritten_layout(tmp_path):
    # Blender camera at (0, -2.25, 0) tracking the origin with 'UP_Y' (blender_script.py 'front' view):
    # matrix_world columns: x = (1,0,0), y (up) = (0,0,1), z (backward) = (0,-1,0).
    pose = np.array([[1.0, 0, 0, 0], [0, 0, -1, -2.25], [0, 1, 0, 0]])
    obj = tmp_path / "uid_a"
    (obj / "pose").mkdir(parents=True)
    for i in range(2):
        np.save(obj / "pose" / f"{i:03d}.npy", pose)
        _png(obj / "rgba" / f"{i:03d}.png", 16, 16, seed=i)
    fx = 16 * 24 / 32
    np.save(obj / "intrinsics.npy", np.array([[fx, fx], [8.0, 8.0], [16.0, 16.0]]))
    (tmp_path / "uids.json").write_text(json.dumps(["uid_a"]))
    for kw in ({}, {"meta_file": "uids.json"}):
        ds = OpenLRMDataset(str(tmp_path), **kw)
        assert ds.object_ids() == ["uid_a"] and ds.num_views(0) == 2
        v = ds.load_views(0, [1])
        want = np.eye(4)
        want[:3, :] = pose
        np.testing.assert_allclose(v.cameras.c2w[0].numpy(), want @ FLIP, atol=1e-6)
        # OpenCV: looks along +y (towards the origin), image y axis points down the world's z
        np.testing.assert_allclose(v.cameras.c2w[0, :3, 2].numpy(), [0, 1, 0], atol=1e-6)
        np.testing.assert_allclose(v.cameras.K[0].numpy(), [[fx, 0, 8], [0, fx, 8], [0, 0, 1]])
        assert v.alpha.shape == (1, 1, 16, 16)
        _check_upright_zup(v.cameras)


def test_instantmesh_handwritten_layout(tmp_path):
    eyes = [[2.5, 0, 0], [0, 2.0, 1.0], [-1.0, -2.0, -0.5]]
    w2c = np.stack([np.linalg.inv(_gl_lookat_zup(e))[:3] for e in eyes])
    obj = tmp_path / "rendering_random_32views" / "uid1"
    obj.mkdir(parents=True)
    np.savez(obj / "cameras.npz", cam_poses=w2c.astype(np.float32))
    for i in range(3):
        _png(obj / f"{i:03d}.png", 10, 10, seed=i)
        n = np.zeros((10, 10, 3), np.uint8)
        n[..., 2] = 255  # +z normal encoded as (0.5, 0.5, 1) ~ (127/128, 255)
        n[..., :2] = 128
        Image.fromarray(n).save(obj / f"{i:03d}_normal.png")
        Image.fromarray(np.full((10, 10), 51, np.uint8)).save(obj / f"{i:03d}_depth.png")
    (tmp_path / "valid_paths.json").write_text(json.dumps({"good_objs": ["uid1"]}))
    ds = InstantMeshDataset(str(tmp_path), image_dir="rendering_random_32views")
    assert ds.object_ids() == ["uid1"] and ds.num_views(0) == 3
    v = ds.load_views(0, [0, 2])
    for k, i in enumerate([0, 2]):
        np.testing.assert_allclose(v.cameras.c2w[k].numpy(), _gl_lookat_zup(eyes[i]) @ FLIP, atol=1e-5)
        np.testing.assert_allclose(v.cameras.centers[k].numpy(), eyes[i], atol=1e-5)
    f = 0.5 * 10 / math.tan(math.radians(25))
    np.testing.assert_allclose(v.cameras.K[0].numpy(), [[f, 0, 5], [0, f, 5], [0, 0, 1]], rtol=1e-6)
    _check_upright_zup(v.cameras)
    fg = v.alpha > 0
    assert v.normals.shape == (2, 3, 10, 10) and v.depths.shape == (2, 1, 10, 10)
    torch.testing.assert_close(v.normals[:, 2:][fg], torch.ones(int(fg.sum())), atol=1e-4, rtol=0)
    torch.testing.assert_close(v.depths[fg], torch.full((int(fg.sum()),), 51 / 255 * 4.0))
    assert (v.depths[~fg] == 0).all()
    # normals/depths off
    v2 = InstantMeshDataset(str(tmp_path), image_dir="rendering_random_32views", normals=False, depths=False).load_views(0, [1])
    assert v2.normals is None and v2.depths is None


def test_gtr_handwritten_camera_file(tmp_path):
    # As scripts/prepare_mv.py: Y-up world, OpenCV c2w built with up = (0, -1, 0), file holds its inverse.
    eye = np.array([0.0, 0.0, 4.0])
    fwd = -eye / 4
    right = np.cross([0.0, -1.0, 0.0], fwd)
    down = np.cross(fwd, right)
    c2w = np.eye(4)
    c2w[:3, :3] = np.column_stack([right, down, fwd])
    c2w[:3, 3] = eye
    w2c = np.linalg.inv(c2w)
    f = 512 / (2 * math.tan(math.radians(15)))
    obj = tmp_path / "mv"
    lines = ["extrinsic"] + [" ".join(f"{x:f}" for x in w2c[r]) + " " for r in range(3)] + ["0 0 0 1", ""]
    lines += ["intrinsic fx, fy, cx, cy, height, width ", f"{f:f} {f:f} 256.000000 256.000000 512 512"]
    obj.mkdir()
    for i in range(2):
        (obj / f"cam_{i:03d}.txt").write_text("\n".join(lines))
        _png(obj / f"rgb_{i:03d}.png", 512, 512, seed=i)
    ds = GTRViewsDataset(str(obj))
    assert ds.object_ids() == ["mv"] and ds.num_views(0) == 2
    v = ds.load_views(0, [1])
    np.testing.assert_allclose(v.cameras.c2w[0].numpy(), c2w, atol=1e-5)
    np.testing.assert_allclose(v.cameras.K[0].numpy(), [[f, 0, 256], [0, f, 256], [0, 0, 1]], rtol=1e-6)
    uv, z = _project(v.cameras, [[0.0, 0.0, 0.0], [0.0, 0.3, 0.0]])
    assert float(z[0, 0]) == pytest.approx(4.0, abs=1e-4)
    assert float(uv[0, 1, 1]) < 255  # +Y (up) goes up the image


# =============================================================================== round trips
def _random_views(V=4, H=12, W=12, up="z", fov=50.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.rand(V, 3, H, W, generator=g)
    alpha = torch.rand(V, 1, H, W, generator=g).clamp_min(0.02)
    alpha[:, :, :3] = 0  # fully transparent rows keep their colour in PNG
    az = torch.linspace(0, 360, V + 1)[:V] + 7
    el = torch.tensor([20.0, -10.0, 35.0, 5.0])[:V]
    cams = orbit_cameras(az, el, torch.linspace(2.0, 3.0, V), fov, W, H, up_axis=up)
    return rgb, alpha, cams


def _assert_same(v, rgb, alpha, cams):
    torch.testing.assert_close(v.cameras.c2w, cams.c2w, atol=1e-5, rtol=0)
    torch.testing.assert_close(v.cameras.K, cams.K, atol=1e-5, rtol=1e-5)
    assert (v.cameras.width, v.cameras.height) == (cams.width, cams.height)
    torch.testing.assert_close(v.rgb, rgb, atol=PIX_TOL, rtol=0)
    torch.testing.assert_close(v.alpha, alpha, atol=PIX_TOL, rtol=0)


def test_round_trip_blender(tmp_path):
    rgb, alpha, cams = _random_views(H=10, W=14)
    write_blender(tmp_path, "obj0", rgb, alpha, cams, split="test")
    write_blender(tmp_path, "obj1", rgb[:2], None, cams[:2], split="test")
    ds = BlenderDataset(str(tmp_path), split="test")
    assert ds.object_ids() == ["obj0", "obj1"]
    _assert_same(ds.load_views(0, [0, 1, 2, 3]), rgb, alpha, cams)
    v = ds.load_views(1, [1])
    assert v.alpha is None
    torch.testing.assert_close(v.rgb, rgb[1:2], atol=PIX_TOL, rtol=0)
    data = json.loads((tmp_path / "obj0" / "transforms_test.json").read_text())
    assert data["camera_angle_x"] == pytest.approx(float(cams.fov_x[0]))


def test_round_trip_openlrm(tmp_path):
    rgb, alpha, cams = _random_views()
    write_openlrm(tmp_path, "u0", rgb, alpha, cams)
    assert np.load(tmp_path / "u0" / "pose" / "000.npy").shape == (3, 4)
    assert np.load(tmp_path / "u0" / "intrinsics.npy").shape == (3, 2)
    ds = OpenLRMDataset(str(tmp_path))
    _assert_same(ds.load_views(0, [0, 1, 2, 3]), rgb, alpha, cams)
    _assert_same(ds.load_views(0, [2]), rgb[2:3], alpha[2:3], cams[2:3])


def test_round_trip_instantmesh_with_normals_and_depths(tmp_path):
    rgb, alpha, cams = _random_views()
    normals = torch.nn.functional.normalize(torch.randn(4, 3, 12, 12), dim=1)
    fg = (alpha > 0).float()
    normals = normals * fg
    depths = torch.rand(4, 1, 12, 12) * 3.5 * fg
    write_instantmesh(tmp_path, "uidA", rgb, alpha, cams, normals=normals, depths=depths)
    write_instantmesh(tmp_path, "uidB", rgb, alpha, cams)
    assert json.loads((tmp_path / "valid_paths.json").read_text()) == {"good_objs": ["uidA", "uidB"]}
    assert np.load(tmp_path / "uidA" / "cameras.npz")["cam_poses"].shape == (4, 3, 4)
    ds = InstantMeshDataset(str(tmp_path))
    v = ds.load_views(0, [0, 1, 2, 3])
    _assert_same(v, rgb, alpha, cams)
    torch.testing.assert_close(v.normals, normals, atol=1.5 * 2 / 255 * math.sqrt(3), rtol=0)
    torch.testing.assert_close(v.depths, depths, atol=0.5 * 4.0 / 255 + 1e-5, rtol=0)
    assert ds.load_views(1, [0]).normals is None
    with pytest.raises(ShapeError, match="fov 50"):
        write_instantmesh(tmp_path, "bad", rgb, alpha, orbit_cameras(torch.zeros(4), torch.zeros(4), 2.0, 30.0, 12, 12))


def test_round_trip_gtr_views(tmp_path):
    rgb, alpha, cams = _random_views(up="y", fov=30.0, H=16, W=16)
    write_gtr_views(tmp_path, "zero123pp", rgb, alpha, cams)
    # upstream read_camera reads the extrinsic from lines 1-4 and 'fx fy cx cy H W' from line 7
    text = (tmp_path / "zero123pp" / "cam_002.txt").read_text().splitlines()
    ext = np.array([[float(x) for x in line.split()] for line in text[1:5]])
    np.testing.assert_allclose(ext, cams.w2c[2].numpy(), atol=1e-6)
    assert [float(x) for x in text[7].split()][4:] == [16, 16]
    ds = GTRViewsDataset(str(tmp_path))
    assert ds.object_ids() == ["zero123pp"]
    _assert_same(ds.load_views(0, [0, 1, 2, 3]), rgb, alpha, cams)


def test_writers_check_arguments(tmp_path):
    rgb, alpha, cams = _random_views()
    with pytest.raises(ShapeError, match="cameras"):
        write_openlrm(tmp_path, "x", rgb[:3], alpha[:3], cams)
    with pytest.raises(ShapeError, match="alpha"):
        write_gtr_views(tmp_path, "x", rgb, alpha[:, :, :5], cams)
    K = cams.K.clone()
    K[1, 0, 0] += 1
    with pytest.raises(ShapeError, match="one intrinsics.npy"):
        write_openlrm(tmp_path, "x", rgb, alpha, Cameras(cams.c2w, K, cams.width, cams.height))


def test_view_index_out_of_range(tmp_path):
    rgb, alpha, cams = _random_views()
    write_gtr_views(tmp_path, "o", rgb, alpha, cams)
    ds = GTRViewsDataset(str(tmp_path / "o"))
    with pytest.raises(IndexError):
        ds.load_views(0, [4])
    with pytest.raises(IndexError):
        ds.load_views(1, [0])


def test_built_from_class_path(tmp_path):
    """Datasets are built by jsonargparse from YAML ``class_path`` + ``init_args``."""
    jsonargparse = pytest.importorskip("jsonargparse")
    rgb, alpha, cams = _random_views(V=2)
    write_blender(tmp_path, "o", rgb, alpha, cams)
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--data", type=BlenderDataset)
    cfg = parser.parse_object({"data": {"class_path": "recon3d.data.formats.BlenderDataset",
                                        "init_args": {"root": str(tmp_path), "split": "train"}}})
    init = parser.instantiate if hasattr(parser, "instantiate") else parser.instantiate_classes
    ds = init(cfg).data
    assert isinstance(ds, BlenderDataset) and ds.num_views(0) == 2



def test_blender_symlinked_object_folder(tmp_path):
    rgb, alpha, cams = _random_views(V=2)
    write_blender(tmp_path / "store", "real", rgb, alpha, cams)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "linked").symlink_to(tmp_path / "store" / "real", target_is_directory=True)
    ds = BlenderDataset(str(tmp_path / "data"))
    assert ds.object_ids() == ["linked"]
    _assert_same(ds.load_views(0, [0, 1]), rgb[:2], alpha[:2], cams[:2])
