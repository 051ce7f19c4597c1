"""3D-FRONT (SSR layout): fixture written in the exact file layout, coordinate chain, depth cache, bad input."""

from __future__ import annotations

import gzip
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recon3d.data.formats.front3d import MASK_PADDING, Front3DDataset
from recon3d.errors import DataError

H, W, R = 24, 32, 64
FOCAL = 20.0
IMGID = "test/rgb/000751_rgb_003848.jpeg"
JID = "0a1b2c3d-jid"
SPHERE = 0.5  # radius of the fixture's SDF sphere, cube units


def _gz(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(buf.getvalue())


def _rot_z(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def write_front3d(root: Path, grid_shape=(R, R, R), box_in_image=True) -> dict:
    """Write one image with one chair in SSR's layout; the camera sits at the world origin (OpenGL
    axes, looking down -z) and the object's centre at world (0.4, 0.2, -3)."""
    rgb = (np.random.default_rng(0).random((H, W, 3)) * 255).astype(np.uint8)
    (root / "test/rgb").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(root / IMGID)
    obj_tran = [0.4, 0.2, -3.0]
    scale = [0.8, 1.2, 1.0]
    anno = {
        "camera_pose_rot": np.eye(3).tolist(),
        "camera_pose_tran": [0.0, 0.0, 0.0],
        "camera_extrinsics": np.eye(4)[:3].tolist(),
        "camera_intrinsics": [[FOCAL, 0, W / 2], [0, FOCAL, H / 2], [0, 0, 1]],
        "obj_dict": {
            "3": {"model_file_name": [JID], "obj_id": [17], "obj_rot": _rot_z(30).tolist(), "obj_tran": obj_tran,
                  "obj_scale": scale, "bbox_2d": [8, 4, 20, 14], "half_length": [0.4, 0.4, 0.4]},
        },
    }
    (root / "test/annotation").mkdir(parents=True, exist_ok=True)
    (root / "test/annotation/000751_annotation_003848.json").write_text(json.dumps(anno))
    mask = np.zeros((H + 2 * MASK_PADDING, W + 2 * MASK_PADDING, 1), dtype=np.uint16)
    if box_in_image:
        mask[MASK_PADDING + 4 : MASK_PADDING + 14, MASK_PADDING + 8 : MASK_PADDING + 20] = 17
    else:
        mask[:50, :50] = 17  # only in the padding, outside the image
    _gz(root / "test/mask/000751_mask_003848.npy.gz", mask)
    depth = np.full((H, W), 3.0, dtype=np.float32)
    depth[0, 0] = 1e10
    _gz(root / "test/depth/000751_depth_003848.npy.gz", depth)
    spacing = 2.0 / R
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in grid_shape], indexing="ij"), -1)
    cube = idx * spacing - 1.0
    _gz(root / f"gt-sdf/chair/{JID}/voxels.npy.gz", (np.linalg.norm(cube, axis=-1) - SPHERE).astype(np.float32))
    meta = {"spacing": spacing, "padding": 0.1, "centroid": [0.05, -0.02, 0.01], "none_equal_scale": [1.5, 1.2, 1.4]}
    (root / f"gt-sdf/chair/{JID}/spacing_centroid.json").write_text(json.dumps(meta))
    (root / "split.json").write_text(json.dumps([[IMGID, "3", "chair"]]))
    return {"anno": anno, "meta": meta}


def test_front3d_sample_camera_sdf_and_extras(tmp_path):
    write_front3d(tmp_path)
    depth_dir = tmp_path / "depth_cache"
    (depth_dir / "test/rgb").mkdir(parents=True)
    np.save(depth_dir / "test/rgb/000751_rgb_003848.npy", np.ones((H, W), np.float32))
    ds = Front3DDataset(str(tmp_path), "split.json", depth_dir=str(depth_dir), num_sdf_points=512)
    assert len(ds) == 1 and ds.object_ids() == ["test/rgb/000751_rgb_003848#3"]
    views = ds.load_views(0, [0])
    assert views.rgb.shape == (1, 3, H, W) and views.alpha.shape == (1, 1, H, W)
    assert views.depths[0, 0, 0, 0] == 0 and views.depths[0, 0, 1, 1] == 3.0
    cams = views.cameras
    # the object frame's origin is the object centre, at world (0.4, 0.2, -3): 3 units ahead,
    # right of and above the image centre (OpenGL y up -> image v smaller).
    uv, z = cams.project(torch.zeros(1, 1, 3))
    torch.testing.assert_close(z, torch.tensor([[3.0]]))
    torch.testing.assert_close(uv, torch.tensor([[[W / 2 + FOCAL * 0.4 / 3, H / 2 - FOCAL * 0.2 / 3]]]))

    geo = ds.load_geometry(0)
    assert geo.sdf_points.shape == (512, 3) and geo.sdf_values.shape == (512,)
    ex = ds.load_extras(0)
    cube = geo.sdf_points * ex["cube_scale"] + ex["cube_offset"]
    # SSR's grid mapping sends voxel index R (not R-1) to +1, so cube point p reads the voxel of
    # p - (p + 1) / R: the analytic sphere SDF there, up to trilinear interpolation error.
    want = (cube - (cube + 1) / R).norm(dim=-1) - SPHERE
    inside = cube.abs().amax(-1) < 0.95
    assert (geo.sdf_values[inside] - want[inside]).abs().max() < 0.01
    assert (geo.sdf_values[inside] - (cube.norm(dim=-1) - SPHERE)[inside]).abs().max() < 0.06
    near = geo.sdf_points[256:]
    assert (ds.load_geometry(0).sdf_values[256:].abs() < 0.2).all() and near.shape == (256, 3)
    torch.testing.assert_close(ex["roi_box"], torch.tensor([8.0, 4.0, 20.0, 14.0]))
    assert ex["class_code"].argmax() == 4 and ex["depth_prior"].shape == (1, H, W)
    torch.testing.assert_close(ds.load_geometry(0).sdf_points, geo.sdf_points)  # deterministic per seed

    obj_units = Front3DDataset(str(tmp_path), "split.json", depth_dir=str(depth_dir), num_sdf_points=512, sdf_units="object")
    ratio = obj_units.load_geometry(0).sdf_values / geo.sdf_values
    torch.testing.assert_close(ratio, torch.full_like(ratio, (0.8 + 1.2 + 1.0) / 3 / ((1.5 + 1.2 + 1.4) / 3)))


def test_front3d_surface_points_lie_on_the_grid_zero_set(tmp_path):
    """SSR's reference surface is the GT grid's zero set; upsampling (SSR reads it at 256^3) stays on it."""
    from recon3d.data.formats.front3d import sample_sdf_grid

    write_front3d(tmp_path)
    residual = {}
    for up in (1, 4):
        ds = Front3DDataset(str(tmp_path), "split.json", require_depth=False, num_sdf_points=16,
                            num_surface_points=2000, surface_upsample=up)
        geo, ex = ds.load_geometry(0), ds.load_extras(0)
        cube = geo.surface_points * ex["cube_scale"] + ex["cube_offset"]
        meta = json.loads((tmp_path / f"gt-sdf/chair/{JID}/spacing_centroid.json").read_text())
        voxels = torch.from_numpy(np.load(io.BytesIO(gzip.decompress((tmp_path / f"gt-sdf/chair/{JID}/voxels.npy.gz").read_bytes()))))
        sdf = sample_sdf_grid(voxels, cube, torch.tensor(meta["spacing"]))
        residual[up] = float(sdf.abs().max())
        assert geo.surface_points.shape == (2000, 3) and geo.surface_normals.shape == (2000, 3)
        # on the analytic (shifted) sphere up to the grid's resolution
        assert ((cube - (cube + 1) / R).norm(dim=-1) - SPHERE).abs().max() < 0.01
    # the 4x extraction follows the trilinear field more closely than marching cubes on the raw grid
    assert residual[4] < residual[1] / 4 and residual[4] < 1e-4, residual
    with pytest.raises(DataError, match="surface_upsample"):
        Front3DDataset(str(tmp_path), "split.json", require_depth=False, surface_upsample=0)


def test_front3d_bad_inputs(tmp_path):
    write_front3d(tmp_path)
    ds = Front3DDataset(str(tmp_path), "split.json", depth_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"000751_rgb_003848\.npy.*recon3d data depth --model-dir"):
        ds.load_extras(0)
    with pytest.raises(DataError, match="depth_dir is required"):
        Front3DDataset(str(tmp_path), "split.json")

    bad_roi = tmp_path / "roi"
    write_front3d(bad_roi, box_in_image=False)
    ds = Front3DDataset(str(bad_roi), "split.json", require_depth=False)
    with pytest.raises(DataError, match=r"000751_mask_003848\.npy\.gz.*outside the"):
        ds.load_views(0, [0])
    ann = bad_roi / "test/annotation/000751_annotation_003848.json"
    a = json.loads(ann.read_text())
    a["obj_dict"]["3"]["bbox_2d"] = [40, 30, 60, 50]
    ann.write_text(json.dumps(a))
    with pytest.raises(DataError, match=r"000751_annotation_003848\.json.*outside the"):
        Front3DDataset(str(bad_roi), "split.json", require_depth=False, bbox_source="annotation").load_extras(0)

    bad_grid = tmp_path / "grid"
    write_front3d(bad_grid, grid_shape=(32, 32, 32))
    ds = Front3DDataset(str(bad_grid), "split.json", require_depth=False)
    with pytest.raises(DataError, match=r"voxels\.npy\.gz.*\(64, 64, 64\)"):
        ds.load_geometry(0)


def _tiny_depth_anything(path: Path) -> None:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=56,
                            patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False)
    cfg = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                              fusion_hidden_size=16, head_hidden_size=8)
    DepthAnythingForDepthEstimation(cfg).save_pretrained(path)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14).save_pretrained(path)


def test_depth_cache_for_front3d_fixture(tmp_path):
    import warnings

    from recon3d.models.depth_prior import compute_depth_cache

    write_front3d(tmp_path / "data")
    _tiny_depth_anything(tmp_path / "da")
    ds = Front3DDataset(str(tmp_path / "data"), "split.json", depth_dir=str(tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = compute_depth_cache(ds, tmp_path / "da", tmp_path / "cache")
    assert paths == [tmp_path / "cache/test/rgb/000751_rgb_003848.npy"]
    prior = ds.load_extras(0)["depth_prior"]
    assert prior.shape == (1, H, W) and torch.isfinite(prior).all()
    stamp = paths[0].stat().st_mtime_ns
    compute_depth_cache(ds, tmp_path / "missing-model", tmp_path / "cache")  # cached: the model is not even loaded
    assert paths[0].stat().st_mtime_ns == stamp
