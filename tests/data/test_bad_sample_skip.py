"""Issue 13: a malformed camera is a DataError that ``on_bad_sample: skip`` skips, and a batch
mixing RGB and RGBA objects names the object without alpha."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from recon3d.data.datamodule import ViewSamplingDataset
from recon3d.data.formats import BlenderDataset
from recon3d.errors import DataError
from tests.data.bad_inputs import _GL_POSE, BATCH_CASES


def _views(root, on_bad_sample):
    return ViewSamplingDataset(
        BlenderDataset(str(root)), num_input_views=1, num_target_views=1, view_sampling="fixed", supervise_inputs=False,
        input_resolution=None, target_resolution=None, background="white", with_geometry=False, seed=0,
        on_bad_sample=on_bad_sample,
    )


def _object(root, name, angle):
    obj = root / name
    (obj / "train").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((8, 8, 4), 200, np.uint8)).save(obj / "train" / f"r_{i}.png")
    frames = [{"file_path": f"./train/r_{i}", "transform_matrix": _GL_POSE} for i in range(2)]
    (obj / "transforms_train.json").write_text(json.dumps({"camera_angle_x": angle, "frames": frames}))


@pytest.mark.parametrize("angle", [0, -0.5, 3.2])
def test_bad_camera_angle_is_skipped(tmp_path, angle):
    _object(tmp_path, "a_good", 0.69)
    _object(tmp_path, "b_zero_fov", angle)
    ds = _views(tmp_path, "skip")
    good = ds[0]
    assert good.object_id == "a_good"
    # focal length from the angle, in closed form: 0.5 W / tan(fov / 2)
    np.testing.assert_allclose(float(good.inputs.cameras.K[0, 0, 0]), 0.5 * 8 / np.tan(0.69 / 2), rtol=1e-6)
    skipped = ds[1]
    assert isinstance(skipped, tuple) and skipped[0] == "b_zero_fov"
    assert "camera_angle_x: expected a field of view in (0, pi) radians" in skipped[1]
    with pytest.raises(DataError, match="camera_angle_x"):
        _views(tmp_path, "raise")[1]


@pytest.mark.parametrize("case", BATCH_CASES, ids=lambda c: c.__name__)
def test_batch_errors_name_the_objects(case, tmp_path):
    factory, expected = case(tmp_path / "case")
    with pytest.raises(DataError) as info:
        factory()
    assert expected in str(info.value) and "\n" not in str(info.value)
