"""Real capture data (issue 12 item 5): missing frames, non-square photos, lens distortion.

References are independent of recon3d: projections are worked out here in float64 numpy from
the manifest's raw OpenGL matrix and intrinsics, and distorted images are made with OpenCV's own
forward lens models (``cv2.projectPoints``, ``cv2.fisheye.projectPoints``).
"""

from __future__ import annotations

import json
import warnings

import cv2
import numpy as np
import pytest
from PIL import Image

from recon3d.data.datamodule import ReconDataModule
from recon3d.data.formats import BlenderDataset
from recon3d.errors import ConfigError, DataError

_GL_POSE = np.array([[1.0, 0.0, 0.0, 0.1], [0.0, 0.0, 1.0, 2.0], [0.0, -1.0, 0.0, -0.2], [0.0, 0.0, 0.0, 1.0]])


def _write(obj, frames, **top):
    obj.mkdir(parents=True, exist_ok=True)
    (obj / "transforms.json").write_text(json.dumps({**top, "frames": frames}))


def _save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# =============================================================================== missing frames
def _scene_with_gaps(obj, n=5, missing=(1, 3), seed=0):
    rng = np.random.default_rng(seed)
    imgs, frames = {}, []
    for i in range(n):
        frames.append({"file_path": f"images/f{i}.png", "transform_matrix": _GL_POSE.tolist(), "fl_x": 7.0 + i})
        if i not in missing:
            imgs[i] = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            _save(obj / "images" / f"f{i}.png", imgs[i])
    _write(obj, frames, camera_angle_x=0.8)
    return imgs


def test_missing_frame_stops_the_load_by_default(tmp_path):
    _scene_with_gaps(tmp_path / "s")
    ds = BlenderDataset(str(tmp_path / "s"))
    assert ds.num_views(0) == 5
    with pytest.raises(DataError, match=r"f1.png: image file not found .*missing_frames: skip"):
        ds.load_views(0, list(range(5)))


def test_skip_missing_frames_reports_one_count(tmp_path):
    imgs = _scene_with_gaps(tmp_path / "a", missing=(1, 3))
    _scene_with_gaps(tmp_path / "b", n=3, missing=(0,), seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = BlenderDataset(str(tmp_path), missing_frames="skip")
        views = ds.load_views(0, [0, 1, 2])
        ds.load_views(1, [0, 1])
    msgs = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(msgs) == 1 and "skipped 3 of 8 frames" in msgs[0], msgs
    assert [ds.num_views(0), ds.num_views(1)] == [3, 2]
    # The kept views are the frames present on disk, in manifest order, with their own cameras.
    for k, i in enumerate((0, 2, 4)):
        np.testing.assert_allclose(views.rgb[k].permute(1, 2, 0).numpy(), imgs[i] / 255.0, atol=1e-6)
        assert float(views.cameras.K[k, 0, 0]) == 7.0 + i


def test_skip_missing_frames_refuses_an_object_with_none(tmp_path):
    _scene_with_gaps(tmp_path / "s", n=2, missing=(0, 1))
    with pytest.raises(DataError, match="none of the 2 listed frames"):
        BlenderDataset(str(tmp_path / "s"), missing_frames="skip")
    with pytest.raises(DataError, match="missing_frames: expected 'error' or 'skip'"):
        BlenderDataset(str(tmp_path / "s"), missing_frames="ignore")


# =============================================================================== non-square photos
def _gl_project(pts, c2w_gl, fx, fy, cx, cy):
    """Pixels (pixel centres at +0.5) of world points for an OpenGL camera (x right, y up, looks along -z)."""
    R, t = c2w_gl[:3, :3], c2w_gl[:3, 3]
    cam = (pts - t) @ R  # R^T (X - t), row-wise
    return np.stack([fx * cam[:, 0] / -cam[:, 2] + cx, fy * -cam[:, 1] / -cam[:, 2] + cy], -1)


def _cv_project(pts, c2w, K):
    """Pixels of world points for an OpenCV camera (x right, y down, looks along +z)."""
    R, t = c2w[:3, :3], c2w[:3, 3]
    cam = (pts - t) @ R
    return np.stack([K[0, 0] * cam[:, 0] / cam[:, 2] + K[0, 2], K[1, 1] * cam[:, 1] / cam[:, 2] + K[1, 2]], -1)


def _bilinear(img, uv):
    """Sample ``img (C, H, W)`` at continuous pixels ``uv (N, 2)`` (pixel centres at +0.5)."""
    x, y = uv[:, 0] - 0.5, uv[:, 1] - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    ax, ay = x - x0, y - y0
    g = lambda yy, xx: img[:, yy, xx]  # noqa: E731
    return ((1 - ax) * (1 - ay) * g(y0, x0) + ax * (1 - ay) * g(y0, x0 + 1) + (1 - ax) * ay * g(y0 + 1, x0)
            + ax * ay * g(y0 + 1, x0 + 1)).T


def _ramp(u, v, W, H):
    """The photo's content at continuous pixel ``(u, v)``: linear in both, so bilinear/antialiased resampling keeps it."""
    return np.stack([u / W, v / H, 0.25 + 0.25 * (u / W) + 0.25 * (v / H)], -1)


def _photo_scene(obj, W, H, alpha):
    fx, fy, cx, cy = 30.0, 33.0, 0.5 * W + 1.3, 0.5 * H - 0.8
    jj, ii = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    img = np.round(_ramp(jj, ii, W, H) * 255).astype(np.uint8)
    if alpha:
        img = np.concatenate([img, np.full((H, W, 1), 255, np.uint8)], -1)
    frames = []
    for i in range(2):
        _save(obj / f"p{i}.png", img)
        frames.append({"file_path": f"p{i}.png", "transform_matrix": _GL_POSE.tolist()})
    _write(obj, frames, fl_x=fx, fl_y=fy, cx=cx, cy=cy, w=W, h=H)
    return fx, fy, cx, cy


def _first_batch(ds, **kw):
    dm = ReconDataModule(ds, num_val_objects=0, num_test_objects=0, num_input_views=2, num_target_views=0,
                         supervise_inputs=True, train_view_sampling="fixed", with_geometry=False, batch_size=1, **kw)
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("W,H", [(40, 24), (24, 40)])
@pytest.mark.parametrize("mode,res", [("center_crop", None), ("center_crop", 16), ("pad", None), ("pad", 20)])
def test_square_views_keep_content_under_projected_points(tmp_path, W, H, mode, res):
    fx, fy, cx, cy = _photo_scene(tmp_path / "p", W, H, alpha=(mode == "pad"))
    batch = _first_batch(BlenderDataset(str(tmp_path / "p")), square=mode, input_resolution=res, background="black")
    img = batch.inputs.images[0, 0].double().numpy()
    side = res or (min(W, H) if mode == "center_crop" else max(W, H))
    assert img.shape == (3, side, side)
    c2w = batch.inputs.cameras.c2w[0, 0].double().numpy()
    K = batch.inputs.cameras.K[0, 0].double().numpy()
    # 3D points seen well inside the kept window of the photo (antialiased resizing blurs the rim).
    s = min(W, H)
    rng = np.random.default_rng(0)
    uv0 = np.stack([rng.uniform((W - s) / 2 + 3, (W + s) / 2 - 3, 50), rng.uniform((H - s) / 2 + 3, (H + s) / 2 - 3, 50)], -1)
    depth = rng.uniform(1.5, 3.0, 50)
    R, t = _GL_POSE[:3, :3], _GL_POSE[:3, 3]
    cam_gl = np.stack([(uv0[:, 0] - cx) / fx * depth, -(uv0[:, 1] - cy) / fy * depth, -depth], -1)
    pts = cam_gl @ R.T + t
    np.testing.assert_allclose(_gl_project(pts, _GL_POSE, fx, fy, cx, cy), uv0, atol=1e-9)
    uv1 = _cv_project(pts, c2w, K)
    want = _ramp(uv0[:, 0], uv0[:, 1], W, H)
    # uint8 quantisation of the ramp is 0.5/255; half a pixel of misregistration would be >= 3/255.
    np.testing.assert_allclose(_bilinear(img, uv1), want, atol=1.0 / 255 + 1e-4)
    if mode == "pad":
        masks = batch.inputs.masks[0, 0, 0].numpy()
        band = (max(W, H) - min(W, H)) // 2
        edge = (slice(None), slice(0, band)) if W < H else (slice(0, band), slice(None))
        if res is None:
            assert masks[edge].max() == 0 and np.abs(img[(slice(None), *edge)]).max() == 0  # background, transparent
            assert masks.sum() == W * H


def test_non_square_default_still_refuses_with_the_option_named(tmp_path):
    _photo_scene(tmp_path / "p", 40, 24, alpha=False)
    with pytest.raises(ConfigError, match=r"resizing non-square images \(40x24\) to 16x16 would distort them; set data.square"):
        _first_batch(BlenderDataset(str(tmp_path / "p")), input_resolution=16)
    with pytest.raises(ConfigError, match="data.square: expected"):
        ReconDataModule(BlenderDataset(str(tmp_path / "p")), square="stretch")


# =============================================================================== lens distortion
_W, _H = 72, 56
_K = np.array([[48.0, 0.0, 36.4], [0.0, 46.0, 27.7], [0.0, 0.0, 1.0]])  # pixel centres at +0.5 (manifest convention)
_SIGMA, _R = 1.4, 5.0  # dot size and centroid window, px
_LENSES = {
    "opencv": ({"camera_model": "OPENCV", "k1": -0.3, "k2": 0.08, "p1": 0.006, "p2": -0.004}, False),
    "radial_k3": ({"k1": 0.2, "k2": -0.04, "k3": 0.01}, False),  # instant-ngp style, no camera_model
    "fisheye": ({"camera_model": "OPENCV_FISHEYE", "k1": 0.12, "k2": -0.02, "k3": 0.004, "k4": 0.0}, True),
    "fisheye_zero_k": ({"is_fisheye": True}, True),  # equidistant: bends rays with every k zero
}


def _lens_forward(keys, fisheye, uv):
    """OpenCV's forward lens model: where the pinhole pixels ``uv (N, 2)`` land in the distorted image."""
    rays = np.stack([(uv[:, 0] - _K[0, 2]) / _K[0, 0], (uv[:, 1] - _K[1, 2]) / _K[1, 1], np.ones(len(uv))], -1)
    k = {n: float(keys.get(n, 0.0)) for n in ("k1", "k2", "k3", "k4", "p1", "p2")}
    # projectPoints is affine in K, so the manifest's +0.5 pixel convention passes straight through.
    if fisheye:
        out, _ = cv2.fisheye.projectPoints(rays[:, None, :], np.zeros(3), np.zeros(3), _K, np.array([k["k1"], k["k2"], k["k3"], k["k4"]]))
    else:
        out, _ = cv2.projectPoints(rays, np.zeros(3), np.zeros(3), _K, np.array([k["k1"], k["k2"], k["p1"], k["p2"], k["k3"]]))
    return out.reshape(-1, 2)


def _pixel_centres():
    jj, ii = np.meshgrid(np.arange(_W) + 0.5, np.arange(_H) + 0.5)
    return np.stack([jj.ravel(), ii.ravel()], -1)


def _grid():
    """Pinhole pixels of a grid of 3D points well inside the image."""
    u, v = np.meshgrid(np.linspace(12.0, _W - 12.0, 5), np.linspace(11.0, _H - 11.0, 4))
    return np.stack([u.ravel(), v.ravel()], -1)


def _dots(at, where):
    """Gaussian dots centred at ``at (N, 2)``, evaluated at the pixel positions ``where (H*W, 2)``, as 8-bit levels."""
    img = sum(np.exp(-((where[:, 0] - u) ** 2 + (where[:, 1] - v) ** 2) / (2 * _SIGMA**2)) for u, v in at)
    return np.round(np.clip(img, 0, 1).reshape(_H, _W) * 255) / 255


def _centroids(img, uv):
    jj, ii = np.meshgrid(np.arange(img.shape[1]) + 0.5, np.arange(img.shape[0]) + 0.5)
    out = []
    for u, v in uv:
        w = img * ((np.abs(jj - u) <= _R) & (np.abs(ii - v) <= _R))
        out.append([(w * jj).sum() / w.sum(), (w * ii).sum() / w.sum()])
    return np.array(out)


def _lens_scene(obj, keys, fisheye, per_frame=False):
    """A capture of dots at the grid points through the lens; returns (distorted image, ideal pinhole image, dot positions)."""
    dots_d = _lens_forward(keys, fisheye, _grid())
    distorted = _dots(dots_d, _pixel_centres())
    # The ideal undistorted view: each pinhole pixel shows what the lens put where that pixel's ray lands.
    ideal = _dots(dots_d, _lens_forward(keys, fisheye, _pixel_centres()))
    grey = np.round(distorted * 255).astype(np.uint8)
    _save(obj / "d.png", np.stack([grey, grey, grey, np.full_like(grey, 255)], -1))
    frame = {"file_path": "d.png", "transform_matrix": _GL_POSE.tolist()}
    top = {"fl_x": _K[0, 0], "fl_y": _K[1, 1], "cx": _K[0, 2], "cy": _K[1, 2], "w": _W, "h": _H}
    (frame if per_frame else top).update(keys)
    _write(obj, [frame], **top)
    return distorted, ideal, dots_d


@pytest.mark.parametrize("name", list(_LENSES))
def test_undistortion_recovers_the_pinhole_projection(tmp_path, name):
    distorted, ideal, dots_d = _lens_scene(tmp_path / name, *_LENSES[name], per_frame=name == "radial_k3")
    grid = _grid()
    before = np.abs(_centroids(distorted, dots_d) - grid).max()  # what ignoring the lens keys left
    assert before > 1.0, before
    v = BlenderDataset(str(tmp_path / name)).load_views(0, [0])
    np.testing.assert_allclose(v.cameras.K[0].double().numpy(), _K, atol=1e-5)  # same pinhole K and size
    got = _centroids(v.rgb[0, 0].double().numpy(), grid)
    # Against the ideal image (OpenCV's remap samples at 1/32 px: ~0.03 px); a half-pixel slip of the
    # principal point at OpenCV's edge (integer pixel centres) gives 0.12-0.22 px here.
    assert np.abs(got - _centroids(ideal, grid)).max() < 0.07
    assert np.abs(got - grid).max() < 0.2  # the dots sit on the pinhole projections of their 3D points
    assert float(v.alpha[0, 0, _H // 2, _W // 2]) == pytest.approx(1.0)


def test_distortion_error_mode_names_the_keys(tmp_path):
    _lens_scene(tmp_path / "s", *_LENSES["opencv"])
    with pytest.raises(DataError, match=r"frame 0: lens distortion k1, k2, p1, p2 \(perspective model\); set distortion: undistort"):
        BlenderDataset(str(tmp_path / "s"), distortion="error").load_views(0, [0])


@pytest.mark.parametrize("keys,match", [
    ({"camera_model": "EQUIRECTANGULAR"}, "camera_model 'EQUIRECTANGULAR' is not supported"),
    ({"k1": 0.1, "k4": 0.01}, r"k4=0.01 is not supported by OpenCV's perspective .*nerfstudio's r\^8"),
    ({"camera_model": "OPENCV_FISHEYE", "p1": 0.01}, "p1=0.01 is not supported by OpenCV's fisheye"),
    ({"k1": "0.1"}, r"k1 \(frame 0\): expected a finite number"),
    ({"is_fisheye": True, "camera_model": "OPENCV"}, "is_fisheye is true but camera_model is 'OPENCV'"),
])
def test_unsupported_lens_is_refused(tmp_path, keys, match):
    _lens_scene(tmp_path / "s", keys, False)
    for mode in ("undistort", "error"):
        with pytest.raises(DataError, match=match) as info:
            BlenderDataset(str(tmp_path / "s"), distortion=mode).load_views(0, [0])
        assert str(info.value).startswith(str(tmp_path / "s" / "transforms.json"))


def test_zero_coefficients_are_a_pinhole(tmp_path):
    distorted, _, _ = _lens_scene(tmp_path / "s", {"camera_model": "OPENCV", "k1": 0.0, "k2": 0, "p1": 0.0, "p2": 0.0}, False)
    v = BlenderDataset(str(tmp_path / "s"), distortion="error").load_views(0, [0])
    np.testing.assert_allclose(v.rgb[0, 0].numpy(), distorted, atol=1e-6)
