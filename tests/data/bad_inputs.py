"""A corpus of bad dataset inputs (issue 2 §8), one function per case.

Each case writes a small broken fixture under the folder it is given and returns
``(dataset_factory, expected_substring)``: calling ``dataset_factory()`` builds the dataset and
loads every view of every object, and must raise :class:`recon3d.errors.DataError` whose
one-line message contains ``expected_substring`` (which names the bad file and the problem).

Use::

    for case in CASES:
        factory, expected = case(tmp_path / case.__name__)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from recon3d.data.formats import BlenderDataset, GTRViewsDataset, ImageFolderDataset, InstantMeshDataset, OpenLRMDataset

Factory = Callable[[], object]
Case = tuple[Factory, str]

_GL_POSE = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 2.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]  # OpenGL c2w at (0, 2, 0) looking at the origin


def load_all(ds) -> None:
    """Touch every view of every object of ``ds`` (what a full epoch would load)."""
    for i in range(len(ds)):
        ds.load_views(i, list(range(ds.num_views(i))))


def _png(path: Path, h: int = 8, w: int = 8, channels: int = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((h, w, channels), 128, np.uint8)
    Image.fromarray(arr[..., 0] if channels == 1 else arr).save(path)


def _blender(root: Path, frames: list[dict] | None = None, n: int = 2, **top) -> Path:
    obj = root / "obj"
    obj.mkdir(parents=True, exist_ok=True)
    if frames is None:
        frames = []
        for i in range(n):
            _png(obj / "train" / f"r_{i}.png")
            frames.append({"file_path": f"./train/r_{i}", "transform_matrix": _GL_POSE})
    data = {"camera_angle_x": 0.69, **top, "frames": frames}
    (obj / "transforms_train.json").write_text(json.dumps(data))
    return obj


def _openlrm(root: Path, n: int = 2, size: int = 8) -> Path:
    obj = root / "uid0"
    for i in range(n):
        _png(obj / "rgba" / f"{i:03d}.png", size, size)
        (obj / "pose").mkdir(parents=True, exist_ok=True)
        np.save(obj / "pose" / f"{i:03d}.npy", np.array(_GL_POSE)[:3])
    np.save(obj / "intrinsics.npy", np.array([[10.0, 10.0], [size / 2, size / 2], [size, size]]))
    return obj


def _instantmesh(root: Path, n: int = 2, poses: np.ndarray | None = None) -> Path:
    obj = root / "uid0"
    obj.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _png(obj / f"{i:03d}.png")
    w2c = np.linalg.inv(np.array(_GL_POSE))[:3]
    np.savez(obj / "cameras.npz", cam_poses=np.stack([w2c] * n) if poses is None else poses)
    return obj


_GTR_CAM = "extrinsic\n1 0 0 0\n0 1 0 0\n0 0 1 4\n0 0 0 1\n\nintrinsic fx, fy, cx, cy, height, width \n10 10 4 4 8 8\n"


def _gtr(root: Path, n: int = 2, cam_text: str = _GTR_CAM) -> Path:
    obj = root / "obj"
    for i in range(n):
        _png(obj / f"rgb_{i:03d}.png")
        (obj / f"cam_{i:03d}.txt").write_text(cam_text)
    return obj


# ---------------------------------------------------------------------------------- missing files
def missing_image_blender(root: Path) -> Case:
    obj = _blender(root)
    (obj / "train" / "r_1.png").unlink()
    return lambda: load_all(BlenderDataset(str(root))), "r_1: image file not found"


def missing_image_instantmesh(root: Path) -> Case:
    obj = _instantmesh(root, n=2, poses=np.stack([np.linalg.inv(np.array(_GL_POSE))[:3]] * 3))
    assert obj.is_dir()
    return lambda: load_all(InstantMeshDataset(str(root))), "002.png: image file not found"


def missing_camera_gtr(root: Path) -> Case:
    obj = _gtr(root)
    (obj / "cam_001.txt").unlink()
    return lambda: load_all(GTRViewsDataset(str(root))), "cam_001.txt: camera file not found"


def missing_intrinsics_openlrm(root: Path) -> Case:
    obj = _openlrm(root)
    (obj / "intrinsics.npy").unlink()
    (root / "uids.json").write_text(json.dumps(["uid0"]))
    return lambda: load_all(OpenLRMDataset(str(root), meta_file="uids.json")), "intrinsics.npy: intrinsics"


# ---------------------------------------------------------------------------------- corrupt images
def garbage_image_openlrm(root: Path) -> Case:
    obj = _openlrm(root)
    (obj / "rgba" / "001.png").write_bytes(b"this is not a png at all" * 10)
    return lambda: load_all(OpenLRMDataset(str(root))), "001.png: cannot decode image"


def truncated_png_gtr(root: Path) -> Case:
    obj = _gtr(root)
    p = obj / "rgb_000.png"
    _png(p, 64, 64)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return lambda: load_all(GTRViewsDataset(str(root))), "rgb_000.png: cannot decode image"


def empty_image_file_blender(root: Path) -> Case:
    obj = _blender(root)
    (obj / "train" / "r_0.png").write_bytes(b"")
    return lambda: load_all(BlenderDataset(str(root))), "r_0.png: cannot decode image"


# ---------------------------------------------------------------------------------- camera files
def gtr_cam_five_numbers(root: Path) -> Case:
    _gtr(root, cam_text="1 2 3 4 5\n")
    return lambda: load_all(GTRViewsDataset(str(root))), "cam_000.txt: expected a 4x4 world-to-camera matrix"


def gtr_cam_malformed_line(root: Path) -> Case:
    _gtr(root, cam_text=_GTR_CAM.replace("0 1 0 0", "0 one 0 0"))
    return lambda: load_all(GTRViewsDataset(str(root))), "cam_000.txt: malformed line"


def openlrm_pose_wrong_shape(root: Path) -> Case:
    obj = _openlrm(root)
    np.save(obj / "pose" / "001.npy", np.eye(3))
    return lambda: load_all(OpenLRMDataset(str(root))), "001.npy: camera pose (c2w): expected shape (3, 4) or (4, 4), got (3, 3)"


def openlrm_intrinsics_wrong_shape(root: Path) -> Case:
    obj = _openlrm(root)
    np.save(obj / "intrinsics.npy", np.eye(3))
    return lambda: load_all(OpenLRMDataset(str(root))), "intrinsics.npy: intrinsics [[fx, fy], [cx, cy], [w, h]]: expected shape (3, 2)"


def openlrm_pose_truncated_npy(root: Path) -> Case:
    obj = _openlrm(root)
    p = obj / "pose" / "000.npy"
    p.write_bytes(p.read_bytes()[:70])
    return lambda: load_all(OpenLRMDataset(str(root))), "000.npy: cannot read camera pose"


def instantmesh_npz_missing_key(root: Path) -> Case:
    obj = _instantmesh(root)
    np.savez(obj / "cameras.npz", poses=np.zeros((2, 3, 4)))
    return lambda: load_all(InstantMeshDataset(str(root))), "cameras.npz: expected an array 'cam_poses'"


def instantmesh_npz_wrong_shape(root: Path) -> Case:
    obj = _instantmesh(root)
    np.savez(obj / "cameras.npz", cam_poses=np.zeros((2, 4)))
    return lambda: load_all(InstantMeshDataset(str(root))), "cameras.npz: cam_poses: expected shape (N, 3, 4)"


def instantmesh_npz_garbage(root: Path) -> Case:
    obj = _instantmesh(root)
    (obj / "cameras.npz").write_bytes(b"PK\x03\x04garbage")
    return lambda: load_all(InstantMeshDataset(str(root))), "cameras.npz: cannot read camera file"


def blender_garbled_json(root: Path) -> Case:
    obj = _blender(root)
    (obj / "transforms_train.json").write_text('{"camera_angle_x": 0.69, "frames": [')
    return lambda: load_all(BlenderDataset(str(root))), "transforms_train.json: cannot parse JSON"


def blender_no_frames(root: Path) -> Case:
    obj = _blender(root)
    (obj / "transforms_train.json").write_text('{"camera_angle_x": 0.69}')
    return lambda: load_all(BlenderDataset(str(root))), "transforms_train.json: expected a 'frames' list"


def blender_no_focal(root: Path) -> Case:
    obj = _blender(root)
    data = json.loads((obj / "transforms_train.json").read_text())
    del data["camera_angle_x"]
    (obj / "transforms_train.json").write_text(json.dumps(data))
    return lambda: load_all(BlenderDataset(str(root))), "transforms_train.json: frame 0: expected 'camera_angle_x' or 'fl_x'"


def blender_matrix_wrong_shape(root: Path) -> Case:
    _blender(root, frames=[{"file_path": "a.png", "transform_matrix": [[1, 0], [0, 1]]}])
    return lambda: load_all(BlenderDataset(str(root))), "transforms_train.json: frames[0].transform_matrix: expected shape (4, 4)"


# ---------------------------------------------------------------------------------- invalid cameras
def nan_pose_openlrm(root: Path) -> Case:
    obj = _openlrm(root)
    pose = np.array(_GL_POSE)[:3]
    pose[1, 3] = np.nan
    np.save(obj / "pose" / "001.npy", pose)
    return lambda: load_all(OpenLRMDataset(str(root))), "001.npy: camera pose (c2w) contains NaN"


def nan_camera_gtr(root: Path) -> Case:
    _gtr(root, cam_text=_GTR_CAM.replace("10 10 4 4", "nan 10 4 4"))
    return lambda: load_all(GTRViewsDataset(str(root))), "cam_000.txt: camera contains NaN"


def nan_matrix_blender(root: Path) -> Case:
    obj = _blender(root)
    (obj / "transforms_train.json").write_text((obj / "transforms_train.json").read_text().replace("2.0", "NaN", 1))
    return lambda: load_all(BlenderDataset(str(root))), "transforms_train.json: frames[0].transform_matrix contains NaN"


def singular_rotation_blender(root: Path) -> Case:
    obj = _blender(root)
    data = json.loads((obj / "transforms_train.json").read_text())
    data["frames"][1]["transform_matrix"] = [[1, 0, 0, 0], [0, 0, 0, 2], [0, 0, 0, 0], [0, 0, 0, 1]]
    (obj / "transforms_train.json").write_text(json.dumps(data))
    return lambda: load_all(BlenderDataset(str(root))), "transforms_train.json: invalid camera: c2w: expected a rotation"


def singular_rotation_instantmesh(root: Path) -> Case:
    poses = np.zeros((2, 3, 4))
    poses[:, 0, 0] = 1
    _instantmesh(root, poses=poses)
    return lambda: load_all(InstantMeshDataset(str(root))), "cameras.npz: invalid camera in cam_poses"


def scaled_rotation_openlrm(root: Path) -> Case:
    obj = _openlrm(root)
    np.save(obj / "pose" / "000.npy", np.array(_GL_POSE)[:3] * 2)
    return lambda: load_all(OpenLRMDataset(str(root))), "000.npy: invalid camera pose"


# ---------------------------------------------------------------------------------- sizes / channels
def mask_wrong_size_blender(root: Path) -> Case:
    obj = _blender(root)
    data = json.loads((obj / "transforms_train.json").read_text())
    for i, fr in enumerate(data["frames"]):
        _png(obj / "masks" / f"m_{i}.png", 8 if i == 0 else 6, 8, channels=1)
        fr["mask_path"] = f"masks/m_{i}.png"
    (obj / "transforms_train.json").write_text(json.dumps(data))
    return lambda: load_all(BlenderDataset(str(root))), "m_1.png: expected image size 8x8 (WxH), got 8x6"


def image_size_mismatch_openlrm(root: Path) -> Case:
    obj = _openlrm(root)
    _png(obj / "rgba" / "001.png", 8, 10)
    return lambda: load_all(OpenLRMDataset(str(root))), "001.png: expected image size 8x8 (WxH), got 10x8"


def normal_wrong_size_instantmesh(root: Path) -> Case:
    obj = _instantmesh(root)
    _png(obj / "000_normal.png", 8, 8, channels=3)
    _png(obj / "001_normal.png", 4, 4, channels=3)
    return lambda: load_all(InstantMeshDataset(str(root))), "001_normal.png: expected image size 8x8 (WxH), got 4x4"


def rgb_instead_of_rgba_gtr(root: Path) -> Case:
    obj = _gtr(root)
    _png(obj / "rgb_001.png", channels=3)
    return lambda: load_all(GTRViewsDataset(str(root))), "rgb_001.png: expected an RGBA image (4 channels: colour + alpha), got 3"


def grey_instead_of_rgba_openlrm(root: Path) -> Case:
    obj = _openlrm(root)
    _png(obj / "rgba" / "000.png", channels=1)
    return lambda: load_all(OpenLRMDataset(str(root))), "000.png: expected an RGBA image (4 channels: colour + alpha), got 1"


def mixed_alpha_blender(root: Path) -> Case:
    obj = _blender(root)
    _png(obj / "train" / "r_0.png", channels=3)
    return lambda: load_all(BlenderDataset(str(root))), "r_0.png: has no alpha channel while 1 other view(s) of this object have one"


# ---------------------------------------------------------------------------------- escaping paths
def escaping_file_path_blender(root: Path) -> Case:
    _png(root / "outside.png")
    _blender(root / "data", frames=[{"file_path": "../../outside.png", "transform_matrix": _GL_POSE}])
    return lambda: load_all(BlenderDataset(str(root / "data"))), "escapes the data root"


def absolute_file_path_blender(root: Path) -> Case:
    _png(root / "outside.png")
    _blender(root / "data", frames=[{"file_path": str((root / "outside.png").resolve()), "transform_matrix": _GL_POSE}])
    return lambda: load_all(BlenderDataset(str(root / "data"))), "escapes the data root"


def escaping_uid_instantmesh(root: Path) -> Case:
    _instantmesh(root / "outside")
    (root / "data").mkdir(parents=True)
    (root / "data" / "valid_paths.json").write_text(json.dumps({"good_objs": ["../outside/uid0"]}))
    return lambda: load_all(InstantMeshDataset(str(root / "data"))), "escapes the data root"


def escaping_uid_openlrm(root: Path) -> Case:
    _openlrm(root / "outside")
    (root / "data").mkdir(parents=True)
    (root / "data" / "uids.json").write_text(json.dumps(["../outside/uid0"]))
    return lambda: load_all(OpenLRMDataset(str(root / "data"), meta_file="uids.json")), "escapes the data root"


def manifest_not_a_list_openlrm(root: Path) -> Case:
    _openlrm(root)
    (root / "uids.json").write_text(json.dumps({"uids": 3}))
    return lambda: load_all(OpenLRMDataset(str(root), meta_file="uids.json")), "uids.json: expected a JSON list of object id strings"


# ---------------------------------------------------------------------------------- empty datasets
def _empty(cls) -> Callable[[Path], Case]:
    def case(root: Path) -> Case:
        root.mkdir(parents=True, exist_ok=True)
        (root / "unrelated_folder").mkdir()
        (root / "notes.txt").write_text("nothing here")
        return lambda: load_all(cls(str(root))), f"{root.name}: no objects found"

    case.__name__ = f"empty_folder_{cls.__name__}"
    return case


empty_folder_blender = _empty(BlenderDataset)
empty_folder_openlrm = _empty(OpenLRMDataset)
empty_folder_instantmesh = _empty(InstantMeshDataset)
empty_folder_gtr = _empty(GTRViewsDataset)


def missing_root(root: Path) -> Case:
    return lambda: load_all(BlenderDataset(str(root / "nope"))), "nope: Blender transforms.json dataset root folder not found"


def object_without_views_openlrm(root: Path) -> Case:
    obj = root / "uid0"
    (obj / "pose").mkdir(parents=True)
    np.save(obj / "intrinsics.npy", np.array([[10.0, 10.0], [4, 4], [8, 8]]))
    return lambda: load_all(OpenLRMDataset(str(root))), "pose: no views found"


def blender_empty_frames(root: Path) -> Case:
    _blender(root, frames=[])
    return lambda: load_all(BlenderDataset(str(root))), "transforms_train.json: 'frames' is empty"


# ---------------------------------------------------------------------------------- issue 13: messages that named the wrong thing
def jpeg_in_png_blender(root: Path) -> Case:
    """A JPEG saved with a .png name among RGBA views: the JPEG is named, not its neighbour."""
    obj = _blender(root)
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(obj / "train" / "r_0.png", format="JPEG")
    return lambda: load_all(BlenderDataset(str(root))), "r_0.png: has no alpha channel (it is a JPEG file despite its .png name)"


def symlink_leaving_root_blender(root: Path) -> Case:
    """A view that is a symlink to a file outside the data root: the message says "symlink"."""
    _png(root / "outside" / "secret.png")
    obj = _blender(root / "data")
    (obj / "train" / "r_1.png").unlink()
    (obj / "train" / "r_1.png").symlink_to(root / "outside" / "secret.png")
    return lambda: load_all(BlenderDataset(str(root / "data"))), f"leaves the data root {obj.resolve()} through the symlink train/r_1.png ->"


def camera_angle_zero_blender(root: Path) -> Case:
    """``camera_angle_x: 0`` (was a ZeroDivisionError)."""
    _blender(root, camera_angle_x=0)
    return lambda: load_all(BlenderDataset(str(root))), "transforms_train.json: camera_angle_x: expected a field of view in (0, pi) radians, got 0"


def mixed_rgb_rgba_objects_batch(root: Path) -> Case:
    """One RGB and one RGBA object in one batch: the collate error names the object without alpha."""
    from recon3d.data.batch import collate_samples
    from recon3d.data.datamodule import ViewSamplingDataset

    for name, channels in (("chair_rgba", 4), ("table_rgb", 3)):
        obj = root / name
        frames = []
        for i in range(2):
            _png(obj / "train" / f"r_{i}.png", channels=channels)
            frames.append({"file_path": f"./train/r_{i}", "transform_matrix": _GL_POSE})
        (obj / "transforms_train.json").write_text(json.dumps({"camera_angle_x": 0.69, "frames": frames}))

    def factory():
        views = ViewSamplingDataset(
            BlenderDataset(str(root)), num_input_views=1, num_target_views=1, view_sampling="fixed", supervise_inputs=False,
            input_resolution=None, target_resolution=None, background="white", with_geometry=False, seed=0, on_bad_sample="raise",
        )
        return collate_samples([views[0], views[1]])

    return factory, "objects ['table_rgb']: have no inputs.masks while ['chair_rgba'] in the same batch do"


# ---------------------------------------------------------------------------------- single-image folders
def _image_folder(root: Path, n: int = 2, channels: int = 4) -> Path:
    for i in range(n):
        _png(root / f"img{i}.png", channels=channels)
    return root


def garbage_image_image_folder(root: Path) -> Case:
    _image_folder(root)
    (root / "img1.png").write_bytes(b"GIF89a but not really" * 4)
    return lambda: load_all(ImageFolderDataset(str(root))), "img1.png: cannot decode image"


def missing_mask_image_folder(root: Path) -> Case:
    _image_folder(root, channels=3)
    _png(root / "masks" / "img0.png", channels=1)
    return lambda: load_all(ImageFolderDataset(str(root), mask_dir="masks")), "img1.png: mask file not found for img1.png"


def mask_wrong_size_image_folder(root: Path) -> Case:
    _image_folder(root, n=1, channels=3)
    _png(root / "masks" / "img0.png", 4, 4, channels=1)
    return lambda: load_all(ImageFolderDataset(str(root), mask_dir="masks")), "img0.png: expected image size 8x8"


def garbled_json_cameras_image_folder(root: Path) -> Case:
    _image_folder(root)
    (root / "cameras.json").write_text('{"img0.png": {"c2w": [1, 2,')
    return lambda: load_all(ImageFolderDataset(str(root), cameras_file="cameras.json")), "cameras.json: cannot parse JSON"


def camera_wrong_shape_image_folder(root: Path) -> Case:
    _image_folder(root, n=1)
    (root / "cameras.json").write_text(json.dumps({"img0.png": {"c2w": [[1, 0, 0], [0, 1, 0]], "K": np.eye(3).tolist()}}))
    factory = lambda: load_all(ImageFolderDataset(str(root), cameras_file="cameras.json"))  # noqa: E731
    return factory, "cameras.json['img0.png']: c2w: expected a 4x4 or 3x4 list of numbers, got shape [2, 3]"


def singular_rotation_image_folder(root: Path) -> Case:
    _image_folder(root, n=1)
    bad = np.array(_GL_POSE)
    bad[:3, :3] *= 2.0
    (root / "cameras.json").write_text(json.dumps({"img0.png": {"c2w": bad.tolist(), "K": [[8, 0, 4], [0, 8, 4], [0, 0, 1]]}}))
    return lambda: load_all(ImageFolderDataset(str(root), cameras_file="cameras.json")), "invalid camera: c2w: expected a rotation"


def image_without_camera_image_folder(root: Path) -> Case:
    _image_folder(root)
    (root / "cameras.json").write_text(json.dumps({"img0.png": {"c2w": np.eye(4).tolist(), "K": np.eye(3).tolist()}}))
    return lambda: load_all(ImageFolderDataset(str(root), cameras_file="cameras.json")), "cameras.json: no camera for img1.png"


def empty_folder_image_folder(root: Path) -> Case:
    root.mkdir(parents=True, exist_ok=True)
    (root / "readme.txt").write_text("no images here")
    return lambda: ImageFolderDataset(str(root)), "no images found"


def same_stem_twice_image_folder(root: Path) -> Case:
    _image_folder(root, n=1)
    _png(root / "img0.jpeg", channels=3)
    return lambda: ImageFolderDataset(str(root)), "img0.png: the object id 'img0' is also img0.jpeg"


CASES: list[Callable[[Path], Case]] = [
    missing_image_blender, missing_image_instantmesh, missing_camera_gtr, missing_intrinsics_openlrm,
    garbage_image_openlrm, truncated_png_gtr, empty_image_file_blender,
    gtr_cam_five_numbers, gtr_cam_malformed_line, openlrm_pose_wrong_shape, openlrm_intrinsics_wrong_shape,
    openlrm_pose_truncated_npy, instantmesh_npz_missing_key, instantmesh_npz_wrong_shape, instantmesh_npz_garbage,
    blender_garbled_json, blender_no_frames, blender_no_focal, blender_matrix_wrong_shape,
    nan_pose_openlrm, nan_camera_gtr, nan_matrix_blender,
    singular_rotation_blender, singular_rotation_instantmesh, scaled_rotation_openlrm,
    mask_wrong_size_blender, image_size_mismatch_openlrm, normal_wrong_size_instantmesh,
    rgb_instead_of_rgba_gtr, grey_instead_of_rgba_openlrm, mixed_alpha_blender,
    escaping_file_path_blender, absolute_file_path_blender, escaping_uid_instantmesh, escaping_uid_openlrm,
    manifest_not_a_list_openlrm,
    empty_folder_blender, empty_folder_openlrm, empty_folder_instantmesh, empty_folder_gtr, missing_root,
    object_without_views_openlrm, blender_empty_frames,
    jpeg_in_png_blender, symlink_leaving_root_blender, camera_angle_zero_blender,
    garbage_image_image_folder, missing_mask_image_folder, mask_wrong_size_image_folder, garbled_json_cameras_image_folder,
    camera_wrong_shape_image_folder, singular_rotation_image_folder, image_without_camera_image_folder,
    empty_folder_image_folder, same_stem_twice_image_folder,
]

#: Cases whose error names objects of a batch rather than a file (same contract otherwise).
BATCH_CASES: list[Callable[[Path], Case]] = [mixed_rgb_rgba_objects_batch]
