"""Every image mode decodes to the right values (issue 13, silent item 3).

Each file is written, then read by :func:`recon3d.data.base.load_image` and compared against an
independent reference: OpenCV's decoder (libpng / libjpeg, ``IMREAD_UNCHANGED``) or the array the
file was written from. Before the fix, palette PNGs came back as palette indices with the
transparency lost, 1-bit masks read white as 1/255, CMYK JPEGs took K for alpha, and 16-bit
colour PNGs kept 8 bits.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from recon3d.data.base import load_image
from recon3d.errors import DataError

RNG = np.random.default_rng(0)
RGBA8 = RNG.integers(0, 256, (6, 7, 4), dtype=np.uint8)


def cv_reference(path) -> tuple[np.ndarray, np.ndarray | None]:
    """OpenCV's decoding as ``rgb (H, W, 3)``, ``alpha (H, W)`` or None, float64 in [0, 1]."""
    arr = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    assert arr is not None
    full = 65535.0 if arr.dtype == np.uint16 else 255.0
    arr = arr.astype(np.float64) / full
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, -1), None
    rgb = arr[..., [2, 1, 0]]
    return rgb, (arr[..., 3] if arr.shape[-1] == 4 else None)


def ours(path) -> tuple[np.ndarray, np.ndarray | None]:
    rgb, alpha = load_image(path)
    assert rgb.dtype == torch.float32 and rgb.shape[0] == 3
    return rgb.permute(1, 2, 0).double().numpy(), (None if alpha is None else alpha[0].double().numpy())


def _palette(path, transparency: str):
    im = Image.fromarray(RGBA8[..., :3]).quantize(8)
    if transparency == "index":
        im.save(path, transparency=3)  # one transparent palette entry (tRNS)
    elif transparency == "table":
        Image.fromarray(RGBA8).quantize(8).save(path)  # per-entry alpha (tRNS table)
    else:
        im.save(path)


WRITERS = {
    "P": lambda p: _palette(p, "none"),
    "P+tRNS index": lambda p: _palette(p, "index"),
    "P+tRNS table": lambda p: _palette(p, "table"),
    "1": lambda p: Image.fromarray(RGBA8[..., 0] > 127).save(p),
    "L": lambda p: Image.fromarray(RGBA8[..., 0]).save(p),
    "LA": lambda p: Image.fromarray(RGBA8[..., :2], "LA").save(p),
    "RGB": lambda p: Image.fromarray(RGBA8[..., :3]).save(p),
    "RGBA": lambda p: Image.fromarray(RGBA8).save(p),
}


@pytest.mark.parametrize("mode", sorted(WRITERS))
def test_png_modes_match_opencv(mode, tmp_path):
    path = tmp_path / "x.png"
    WRITERS[mode](path)
    rgb, alpha = ours(path)
    ref_rgb, ref_alpha = cv_reference(path)
    np.testing.assert_allclose(rgb, ref_rgb, atol=1e-6)
    assert (alpha is None) == (ref_alpha is None), (mode, alpha is None)
    if alpha is not None:
        np.testing.assert_allclose(alpha, ref_alpha, atol=1e-6)


def test_one_bit_mask_is_zero_or_one(tmp_path):
    mask = RGBA8[..., 0] > 127
    Image.fromarray(mask).save(tmp_path / "m.png")
    rgb, alpha = ours(tmp_path / "m.png")
    assert alpha is None
    np.testing.assert_array_equal(rgb[..., 0], mask.astype(np.float64))  # white is 1.0, not 1/255


def test_palette_transparency_is_alpha(tmp_path):
    _palette(tmp_path / "p.png", "index")
    idx = np.asarray(Image.open(tmp_path / "p.png"))
    _, alpha = ours(tmp_path / "p.png")
    np.testing.assert_array_equal(alpha, (idx != 3).astype(np.float64))


def test_palette_with_alpha_pa_mode(tmp_path):
    # PIL cannot write PA files; build one in memory and compare against the palette lookup by hand.
    pal = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    idx = RNG.integers(0, 256, (5, 4), dtype=np.uint8)
    a = RNG.integers(0, 256, (5, 4), dtype=np.uint8)
    from recon3d.data.base import _image_array

    im = Image.fromarray(idx, "P")
    im.putpalette(pal.reshape(-1).tolist())
    pa = im.convert("PA")
    pa.putalpha(Image.fromarray(a, "L"))
    arr, full = _image_array(pa, tmp_path / "pa")
    np.testing.assert_array_equal(arr[..., :3], pal[idx])
    np.testing.assert_array_equal(arr[..., 3], a)
    assert full == 255.0


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_16bit_png_full_precision(channels, tmp_path):
    data = RNG.integers(0, 65536, (6, 7, channels), dtype=np.uint16)
    bgr = data[..., 0] if channels == 1 else data[..., [2, 1, 0, 3][:channels]]
    assert cv2.imwrite(str(tmp_path / "x.png"), bgr)
    rgb, alpha = ours(tmp_path / "x.png")
    want = data.astype(np.float64) / 65535.0
    np.testing.assert_allclose(rgb, np.repeat(want[..., :1], 3, -1) if channels == 1 else want[..., :3], atol=1e-7)
    if channels == 4:
        np.testing.assert_allclose(alpha, want[..., 3], atol=1e-7)
    else:
        assert alpha is None


def test_cmyk_jpeg_is_rgb_without_alpha(tmp_path):
    Image.fromarray(RGBA8[..., :3]).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    rgb, alpha = ours(tmp_path / "c.jpg")
    assert alpha is None  # K is not alpha
    ref, _ = cv_reference(tmp_path / "c.jpg")
    np.testing.assert_allclose(rgb, ref, atol=2 / 255)


def test_jpeg_named_png_decodes_as_jpeg(tmp_path):
    Image.fromarray(RGBA8[..., :3]).save(tmp_path / "j.png", format="JPEG", quality=95, subsampling=0)
    rgb, alpha = ours(tmp_path / "j.png")
    ref, _ = cv_reference(tmp_path / "j.png")
    assert alpha is None
    np.testing.assert_allclose(rgb, ref, atol=3 / 255)


def test_float_and_int32_tiff(tmp_path):
    f = RNG.random((6, 7), dtype=np.float32)
    Image.fromarray(f, "F").save(tmp_path / "f.tiff")
    rgb, _ = ours(tmp_path / "f.tiff")
    np.testing.assert_allclose(rgb[..., 0], f, atol=1e-7)
    i = RNG.integers(0, 65536, (6, 7)).astype(np.int32)
    Image.fromarray(i, "I").save(tmp_path / "i.tiff")
    rgb, _ = ours(tmp_path / "i.tiff")
    np.testing.assert_allclose(rgb[..., 0], i / 65535.0, atol=1e-7)


def test_float_image_out_of_range_is_refused(tmp_path):
    Image.fromarray(np.full((4, 4), 7.5, np.float32), "F").save(tmp_path / "f.tiff")
    with pytest.raises(DataError, match=r"f\.tiff: float image with values outside \[0, 1\]"):
        load_image(tmp_path / "f.tiff")


def test_one_bit_mask_through_blender_reader(tmp_path):
    """A 1-bit ``mask_path`` file is the object's alpha (0/1), not an all-background mask."""
    from recon3d.data.formats import BlenderDataset

    obj = tmp_path / "obj"
    (obj / "train").mkdir(parents=True)
    mask = np.zeros((8, 8), bool)
    mask[2:6, 3:7] = True
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(obj / "train" / "r_0.png")
    Image.fromarray(mask).save(obj / "train" / "m_0.png")
    pose = [[1.0, 0, 0, 0], [0, 0, 1, 2], [0, -1, 0, 0], [0, 0, 0, 1]]
    (obj / "transforms_train.json").write_text(json.dumps({
        "camera_angle_x": 0.69, "frames": [{"file_path": "./train/r_0", "mask_path": "train/m_0.png", "transform_matrix": pose}]}))
    raw = BlenderDataset(str(tmp_path)).load_views(0, [0])
    np.testing.assert_array_equal(raw.alpha[0, 0].numpy(), mask.astype(np.float32))
