"""``ImageFolderDataset``: single images, one object each, for single-image methods (issue 14 item 4)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from recon3d.data.datamodule import ReconDataModule, ViewSamplingDataset, collate_or_skip
from recon3d.data.formats import ImageFolderDataset
from recon3d.errors import ConfigError, DataError

_GL_POSE = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 2.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]


def _rgba(seed: int, size=(12, 10)) -> np.ndarray:
    """``(H, W, 4)`` uint8: random colour, alpha 255 inside a centred box, 0 outside, one half-alpha pixel."""
    h, w = size
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    arr[..., 3] = 0
    arr[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4, 3] = 255
    arr[0, 0, 3] = 128
    return arr


def _views(ds, **kw) -> ViewSamplingDataset:
    args = dict(num_input_views=1, num_target_views=0, view_sampling="fixed", supervise_inputs=True, input_resolution=None,
                target_resolution=None, background="black", with_geometry=False, seed=0, on_bad_sample="raise")
    args.update(kw)
    return ViewSamplingDataset(ds, **args)


def test_rgba_images_are_unposed_objects_composited_by_the_datamodule(tmp_path):
    arrs = {name: _rgba(i) for i, name in enumerate(["b_table", "a_chair"])}
    for name, arr in arrs.items():
        Image.fromarray(arr).save(tmp_path / f"{name}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(str(tmp_path))
    assert ds.object_ids() == ["a_chair", "b_table"] and ds.num_views(0) == 1
    raw = ds.load_views(0, [0])
    arr = arrs["a_chair"].astype(np.float32) / 255
    assert raw.cameras is None
    np.testing.assert_allclose(raw.rgb[0].permute(1, 2, 0).numpy(), arr[..., :3], atol=1e-6)
    np.testing.assert_allclose(raw.alpha[0, 0].numpy(), arr[..., 3], atol=1e-6)
    # Through the datamodule's sampling and collation: composited on black, cameras None, targets = inputs.
    batch = collate_or_skip([_views(ds)[0], _views(ds)[1]])
    assert batch.object_ids == ["a_chair", "b_table"] and batch.inputs.cameras is None
    np.testing.assert_allclose(batch.inputs.images[0, 0].permute(1, 2, 0).numpy(), arr[..., :3] * arr[..., 3:], atol=1e-6)
    assert torch.equal(batch.targets.images, batch.inputs.images)
    with pytest.raises(DataError, match="LGM needs inputs.cameras.*unposed"):
        batch.require("inputs.cameras", who="LGM")


def test_rgb_images_are_colour_keyed_against_the_background(tmp_path):
    h, w = 8, 9
    rgb = np.full((h, w, 3), 255, np.uint8)  # white background ...
    rgb[2:6, 3:7] = [200, 30, 40]  # ... and a red object
    rgb[0, 0] = [252, 253, 255]  # within the tolerance of white
    Image.fromarray(rgb).save(tmp_path / "obj.png")
    want = np.zeros((h, w), np.float32)
    want[2:6, 3:7] = 1
    alpha = ImageFolderDataset(str(tmp_path), background=(1.0, 1.0, 1.0)).load_views(0, [0]).alpha
    np.testing.assert_array_equal(alpha[0, 0].numpy(), want)
    # Without a key the RGB image carries no mask (used as it is).
    assert ImageFolderDataset(str(tmp_path)).load_views(0, [0]).alpha is None
    with pytest.raises(ConfigError, match="background"):
        ImageFolderDataset(str(tmp_path), background=(255, 255, 255))


def test_mask_folder_gives_the_alpha_of_rgb_images(tmp_path):
    Image.fromarray(np.full((6, 6, 3), 90, np.uint8)).save(tmp_path / "obj.jpg")
    (tmp_path / "masks").mkdir()
    mask = np.zeros((6, 6), np.uint8)
    mask[1:4, 2:5] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "obj.png")
    raw = ImageFolderDataset(str(tmp_path), mask_dir="masks").load_views(0, [0])
    np.testing.assert_array_equal(raw.alpha[0, 0].numpy(), mask / 255.0)


def test_different_sizes_batch_after_resizing(tmp_path):
    Image.fromarray(_rgba(0, (16, 16))).save(tmp_path / "a.png")
    Image.fromarray(_rgba(1, (24, 24))).save(tmp_path / "b.png")
    ds = ImageFolderDataset(str(tmp_path))
    batch = collate_or_skip([_views(ds, input_resolution=8, target_resolution=8)[i] for i in range(2)])
    assert batch.inputs.images.shape == (2, 1, 3, 8, 8) and batch.inputs.masks.shape == (2, 1, 1, 8, 8)


def test_cameras_file_poses_each_image(tmp_path):
    for name in ("a", "b"):
        Image.fromarray(_rgba(0, (8, 10))).save(tmp_path / f"{name}.png")
    K = [[12.0, 0, 5.0], [0, 12.0, 4.0], [0, 0, 1]]
    cv = (np.array(_GL_POSE) @ np.diag([1.0, -1.0, -1.0, 1.0])).tolist()
    (tmp_path / "cameras.json").write_text(json.dumps({
        "a.png": {"c2w": _GL_POSE, "K": K, "convention": "opengl"},
        "b.png": {"c2w": cv[:3], "K": K, "projection": "orthographic"},
    }))
    ds = ImageFolderDataset(str(tmp_path), cameras_file="cameras.json")
    a, b = ds.load_views(0, [0]).cameras, ds.load_views(1, [0, 0]).cameras
    assert (a.width, a.height) == (10, 8) and a.projection == "perspective"
    # The OpenGL pose and its OpenCV conversion (y, z columns flipped) are the same camera.
    np.testing.assert_allclose(a.c2w[0].numpy(), np.array(cv), atol=1e-6)
    assert b.batch_shape == (2,) and b.projection == "orthographic"
    np.testing.assert_allclose(b.c2w[1].numpy(), np.array(cv), atol=1e-6)
    np.testing.assert_allclose(b.K[0].numpy(), np.array(K), atol=1e-6)
    batch = collate_or_skip([_views(ds)[0]])
    batch.require("inputs.cameras", who="LGM")


def test_unreadable_image_is_one_line_or_a_counted_skip(tmp_path):
    Image.fromarray(_rgba(0)).save(tmp_path / "a_good.png")
    (tmp_path / "b_broken.png").write_bytes(b"not a png" * 5)
    ds = ImageFolderDataset(str(tmp_path))
    with pytest.raises(DataError) as info:
        _views(ds)[1]
    assert str(info.value).startswith(str(tmp_path / "b_broken.png")) and "cannot decode image" in str(info.value)
    batch = collate_or_skip([_views(ds, on_bad_sample="skip")[i] for i in range(2)])
    assert batch.object_ids == ["a_good"]
    assert [s[0] for s in batch.skipped] == ["b_broken"] and "cannot decode image" in batch.skipped[0][1]


def test_datamodule_serves_single_images(tmp_path):
    for i in range(3):
        Image.fromarray(_rgba(i, (16, 16))).save(tmp_path / f"img{i}.png")
    dm = ReconDataModule(ImageFolderDataset(str(tmp_path)), num_val_objects=1, num_test_objects=0, num_input_views=1,
                         num_target_views=0, batch_size=2, input_resolution=8, target_resolution=8)
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 2 and batch.inputs.cameras is None and batch.inputs.images.shape == (2, 1, 3, 8, 8)
