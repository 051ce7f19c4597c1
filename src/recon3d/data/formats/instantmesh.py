"""InstantMesh's Objaverse render layout (``TencentARC/InstantMesh``).

Layout (facts from ``src/data/objaverse.py`` and ``src/utils/camera_util.py``)::

    <root>/valid_paths.json                     # {"good_objs": [uid, ...]} (or a plain list)
    <root>/<image_dir>/<uid>/000.png ...        # RGBA renders
    <root>/<image_dir>/<uid>/000_normal.png     # optional: world-space normals, (n + 1) / 2
    <root>/<image_dir>/<uid>/000_depth.png      # optional: depth = raw value / 255 * depth_scale
    <root>/<image_dir>/<uid>/cameras.npz        # cam_poses (N, 3, 4): world-to-camera

``cam_poses`` are **OpenGL** world-to-camera matrices: upstream computes ``c2w = inv(w2c)`` and
feeds it to the same network as its own look-at cameras, which ``center_looking_at_camera_pose``
builds in OpenGL axes (x right, y up, z backward). So ``c2w_cv = inv(w2c) @ diag(1, -1, -1, 1)``.
The files store no intrinsics: upstream uses ``fov = 50`` degrees (both axes, principal point at
the centre). World: +Z up. ``depth_scale`` is 4.0 in the released loader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recon3d.data.base import RawViews, load_image, resolve_inside
from recon3d.data.cameras import OPENGL_TO_OPENCV, Cameras
from recon3d.data.formats._common import (
    FolderDataset,
    build_cameras,
    check_writer_inputs,
    load_npz_array,
    load_view_images,
    read_json,
    read_uid_list,
    save_png,
    to_uint8,
    write_json,
)
from recon3d.errors import DataError, ShapeError
from recon3d.utils.io import atomic_path

__all__ = ["InstantMeshDataset", "write_instantmesh"]


@dataclass
class _Meta:
    folder: Path
    w2c: np.ndarray  # (N, 3|4, 4) OpenGL


def _intrinsics(fov_deg: float, W: int, H: int) -> torch.Tensor:
    f = 0.5 / math.tan(math.radians(fov_deg) / 2)
    return torch.tensor([[f * W, 0, 0.5 * W], [0, f * H, 0.5 * H], [0, 0, 1]], dtype=torch.float32)


class InstantMeshDataset(FolderDataset):
    """Objects rendered in InstantMesh's ``<uid>/{NNN.png, cameras.npz}`` layout.

    Args:
        root: dataset root (holds ``meta_file`` if any).
        image_dir: sub-folder of ``root`` holding the uid folders (upstream:
            ``rendering_random_32views``); ``""`` means ``root`` itself.
        meta_file: JSON uid list relative to ``root`` (``{"good_objs": [...]}`` or a list). None:
            use ``valid_paths.json`` if present, else every folder holding ``cameras.npz``.
        fov_deg: field of view of every render, degrees (upstream: 50).
        normals: load ``NNN_normal.png`` (True: required; False: skip; None: if present for the
            first requested view).
        depths: same for ``NNN_depth.png``.
        depth_scale: depth = raw PNG value / 255 * ``depth_scale`` (upstream: 4.0).

    ``load_views`` returns ``rgb (V,3,H,W)``, ``alpha (V,1,H,W)`` or None, cameras ``(V,)``,
    ``normals (V,3,H,W)`` (unit, world space, 0 where alpha is 0) and ``depths (V,1,H,W)``.
    """

    name = "InstantMesh render dataset"

    def __init__(
        self,
        root: str,
        image_dir: str = "",
        meta_file: str | None = None,
        fov_deg: float = 50.0,
        normals: bool | None = None,
        depths: bool | None = None,
        depth_scale: float = 4.0,
    ) -> None:
        super().__init__(root)
        self.image_root = resolve_inside(self.root, image_dir or ".", "image_dir")
        if not self.image_root.is_dir():
            raise DataError(self.image_root, "image folder not found; expected the folder of <uid>/ render folders")
        if not (0 < float(fov_deg) < 180):
            raise DataError(self.root, f"fov_deg: expected a field of view in (0, 180) degrees, got {fov_deg!r}")
        self.fov_deg, self.normals, self.depths, self.depth_scale = float(fov_deg), normals, depths, float(depth_scale)
        if meta_file is None and (self.root / "valid_paths.json").is_file():
            meta_file = "valid_paths.json"
        if meta_file is not None:
            ids = read_uid_list(self.image_root, self.root / meta_file)
            dirs = [resolve_inside(self.image_root, u, f"uid in {meta_file}") for u in ids]
        else:
            dirs = [d for d in sorted(self.image_root.iterdir()) if d.is_dir() and (d / "cameras.npz").is_file()]
            ids = [d.name for d in dirs]
        self._set_objects(dirs, ids, "<uid>/ folders with NNN.png and cameras.npz (and optionally valid_paths.json)")

    def _read_meta(self, index: int) -> _Meta:
        folder = self._dirs[index]
        w2c = load_npz_array(
            folder / "cameras.npz", "cam_poses", "camera file",
            lambda s: len(s) == 3 and s[1] in (3, 4) and s[2] == 4, "(N, 3, 4) world-to-camera",
        )
        if w2c.shape[0] == 0:
            raise DataError(folder / "cameras.npz", "cam_poses is empty; expected at least one view")
        return _Meta(folder, w2c)

    def num_views(self, index: int) -> int:
        return int(self._meta(index).w2c.shape[0])

    def _want(self, flag: bool | None, path: Path) -> bool:
        return path.is_file() if flag is None else bool(flag)

    def load_views(self, index: int, views: list[int]) -> RawViews:
        """Load ``views`` of object ``index`` (see class docstring for shapes)."""
        meta = self._meta(index)
        self._check_views(index, views)
        views = [int(v) for v in views]
        rgb, alpha = load_view_images([meta.folder / f"{v:03d}.png" for v in views])
        H, W = rgb.shape[-2:]
        cam_path = meta.folder / "cameras.npz"
        w2c = torch.from_numpy(meta.w2c[views]).float()
        try:
            # validate as a rigid transform, then invert exactly
            c2w_gl = Cameras.from_w2c(w2c, torch.eye(3).expand(len(views), 3, 3), W, H).c2w
        except ShapeError as e:
            raise DataError(cam_path, f"invalid camera in cam_poses: {e}") from None
        K = _intrinsics(self.fov_deg, W, H).expand(len(views), 3, 3).clone()
        cams = build_cameras(cam_path, lambda: Cameras(c2w_gl @ OPENGL_TO_OPENCV, K, W, H))
        out = RawViews(rgb=rgb, cameras=cams, alpha=alpha)
        fg = None if alpha is None else (alpha > 0).float()
        if views and self._want(self.normals, meta.folder / f"{views[0]:03d}_normal.png"):
            ns = []
            for v in views:
                n, _ = load_image(meta.folder / f"{v:03d}_normal.png", (H, W))
                ns.append(torch.nn.functional.normalize(n * 2 - 1, dim=0, eps=1e-6))
            out.normals = torch.stack(ns) * (fg if fg is not None else 1.0)
        if views and self._want(self.depths, meta.folder / f"{views[0]:03d}_depth.png"):
            ds = [_load_depth(meta.folder / f"{v:03d}_depth.png", (H, W)) * (self.depth_scale / 255.0) for v in views]
            out.depths = torch.stack(ds) * (fg if fg is not None else 1.0)
        return out


def _load_depth(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """Raw integer values of a grey PNG (8- or 16-bit; of an RGB(A) one its first channel) as
    ``(1, H, W)`` float. Palette, bilevel and CMYK files are refused: their stored numbers are
    not depths."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(path, "depth image not found")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "LA", "I", "RGB", "RGBA") and not im.mode.startswith("I;16"):
                raise DataError(path, f"depth image of mode {im.mode!r}; expected a grey 8- or 16-bit PNG of raw depth values")
            arr = np.asarray(im)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(path, f"cannot decode depth image ({type(e).__name__}: {e}); expected a PNG") from None
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.shape != tuple(size):
        raise DataError(path, f"expected image size {size[1]}x{size[0]} (WxH), got {arr.shape[-1]}x{arr.shape[0]}")
    return torch.from_numpy(arr.astype(np.float32))[None]


def write_instantmesh(
    out_dir: str | Path,
    object_id: str,
    rgb: torch.Tensor,
    alpha: torch.Tensor | None,
    cameras: Cameras,
    normals: torch.Tensor | None = None,
    depths: torch.Tensor | None = None,
    depth_scale: float = 4.0,
    fov_deg: float = 50.0,
    update_manifest: bool = True,
) -> Path:
    """Write one object in InstantMesh's layout under ``out_dir/object_id`` (atomic file writes).

    Args:
        rgb: ``(V, 3, H, W)``; alpha ``(V, 1, H, W)`` or None (opaque). Written as RGBA ``NNN.png``.
        cameras: ``(V,)``; must have ``fov_deg`` on both axes and a centred principal point, since
            the layout stores no intrinsics. Poses go to ``cameras.npz['cam_poses']`` as ``(V, 3, 4)``
            OpenGL world-to-camera.
        normals: optional ``(V, 3, H, W)`` world-space unit normals → ``NNN_normal.png`` as (n+1)/2.
        depths: optional ``(V, 1, H, W)`` depth → 8-bit ``NNN_depth.png`` = depth / depth_scale * 255
            (quantised to ``depth_scale / 255``; values above ``depth_scale`` are clipped).
        update_manifest: add ``object_id`` to ``out_dir/valid_paths.json`` (``{"good_objs": [...]}``).
            Not safe against concurrent writers of the same ``out_dir``.

    Returns the object folder. Raises :class:`ShapeError` for cameras the layout cannot store.
    """
    V, H, W = check_writer_inputs(rgb, alpha, cameras)
    want = _intrinsics(fov_deg, W, H).double()
    K = cameras.K.detach().double().cpu().reshape(-1, 3, 3)
    if V and not torch.allclose(K, want.expand_as(K), rtol=1e-4, atol=1e-3):
        raise ShapeError(
            f"cameras: the InstantMesh layout stores no intrinsics; expected fov {fov_deg} deg on both axes with a centred "
            f"principal point (fx={want[0, 0]:.4g}, fy={want[1, 1]:.4g}), got fx={K[0, 0, 0]:.4g}, fy={K[0, 1, 1]:.4g}"
        )
    folder = Path(out_dir) / object_id
    a = alpha if alpha is not None else torch.ones_like(rgb[:, :1])
    for i in range(V):
        save_png(folder / f"{i:03d}.png", to_uint8(torch.cat([rgb[i], a[i]], 0)))
        if normals is not None:
            save_png(folder / f"{i:03d}_normal.png", to_uint8((normals[i] + 1) / 2))
        if depths is not None:
            save_png(folder / f"{i:03d}_depth.png", to_uint8(depths[i] / depth_scale))
    w2c_gl = torch.linalg.inv(cameras.to_opengl().detach().double().cpu())[:, :3, :4].numpy()
    with atomic_path(folder / "cameras.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, cam_poses=w2c_gl.astype(np.float32))
    if update_manifest:
        manifest = Path(out_dir) / "valid_paths.json"
        data = read_json(manifest, "valid_paths.json") if manifest.is_file() else {"good_objs": []}
        if not isinstance(data, dict) or not isinstance(data.get("good_objs"), list):
            raise DataError(manifest, "expected a JSON object {\"good_objs\": [uid, ...]}")
        if object_id not in data["good_objs"]:
            data["good_objs"].append(object_id)
        write_json(manifest, data)
    return folder
