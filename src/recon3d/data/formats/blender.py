"""Blender / NeRF-synthetic ``transforms.json`` folders (also nerfstudio's variant).

Layout of one object (a folder)::

    <object>/transforms_train.json     # or transforms.json (used for every split when the split file is absent)
    <object>/train/r_0.png ...         # frames[i].file_path, relative to the object folder, extension optional

JSON keys read (top level, each may be overridden per frame): ``camera_angle_x`` (horizontal
fov, radians), optional ``camera_angle_y``, ``fl_x``, ``fl_y``, ``cx``, ``cy``, ``w``, ``h``;
``frames[].file_path``, ``frames[].transform_matrix`` (**OpenGL/Blender c2w**, 4x4 or 3x4) and
optional ``frames[].mask_path`` (nerfstudio: a foreground mask image of the same size).
recon3d's own renders (``write_blender(depths=, normals=)``, ``recon3d data render-meshes``) add
optional ``frames[].depth_path`` (a 16-bit grey PNG: z-depth = stored integer x ``depth_scale``,
``depth_scale`` at top level or per frame; 0 = empty) and ``frames[].normal_path`` (an RGB PNG of
world unit normals as ``(n + 1) / 2``; mid-grey, i.e. ``n = 0``, where empty), loaded into
``RawViews.depths`` / ``RawViews.normals``. Their ``mesh.ply`` (the normalised ground-truth mesh,
in the cameras' world frame) is the object's geometry (:meth:`BlenderDataset.load_geometry`).

Conversion: ``c2w_cv = transform_matrix @ diag(1, -1, -1, 1)``; ``fx = fl_x`` or
``0.5 W / tan(camera_angle_x / 2)``; ``fy = fl_y`` or from ``camera_angle_y`` or ``fx``;
``cx, cy`` default to the image centre. The world frame is the file's (Blender: +Z up).

A root that holds a transforms file is one object; otherwise each sub-folder that holds one is
an object. Image and mask paths in the JSON must stay inside their object folder (``..`` or
absolute paths that leave it are refused); the object folder itself may be a symlink.

Real captures (nerfstudio ``ns-process-data``, instant-ngp ``colmap2nerf``) add lens keys
(``k1 k2 k3 k4 p1 p2``, ``camera_model``, ``is_fisheye``; see :mod:`._lens`): by default the
images are undistorted with OpenCV at load time onto the same pinhole ``K`` (``distortion:
undistort``), or refused with the keys named (``distortion: error``); never ignored. Published
scenes often list frames whose files were pruned: ``missing_frames: skip`` drops them (one
warning with the count), the default ``error`` stops at the first one.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from recon3d.data.base import RawViews, focal_from_fov, load_image, resolve_inside
from recon3d.data.batch import Geometry
from recon3d.data.cameras import Cameras
from recon3d.data.formats._common import (
    FolderDataset,
    build_cameras,
    check_writer_inputs,
    load_mask,
    load_view_images,
    read_json,
    save_png,
    to_uint8,
    write_json,
)
from recon3d.data.formats._lens import LENS_KEYS, Lens, parse_lens, undistort
from recon3d.errors import DataError
from recon3d.utils.checks import check_shape

__all__ = ["BlenderDataset", "write_blender"]

_INTRINSIC_KEYS = ("camera_angle_x", "camera_angle_y", "fl_x", "fl_y", "cx", "cy", "w", "h")
#: 16-bit steps of a depth PNG: depth = stored integer x depth_scale.
DEPTH_PNG_MAX = 65535
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".PNG", ".JPG")


@dataclass
class _Frame:
    image: Path
    mask: Path | None
    c2w_gl: np.ndarray  # (4, 4) or (3, 4)
    intr: dict
    lens: Lens | None = None
    depth: Path | None = None
    normal: Path | None = None
    depth_scale: float | None = None


@dataclass
class _Meta:
    json_path: Path
    frames: list[_Frame]
    #: frames listed in the manifest whose image (or mask) file is absent (``missing_frames: skip``)
    skipped: list[Path] = field(default_factory=list)


class BlenderDataset(FolderDataset):
    """Objects stored as Blender/NeRF ``transforms_{split}.json`` folders.

    Args:
        root: one object folder (holding a transforms file) or a folder of such object folders.
        split: which ``transforms_{split}.json`` to read (``train``, ``val``, ``test``); a folder
            with only ``transforms.json`` uses it for every split.
        scale: multiplies camera positions (to bring a scene into ``[-1, 1]^3``; NeRF-synthetic
            scenes span about ``[-1.5, 1.5]^3``, so ``scale: 0.67`` normalises them).
        missing_frames: ``"error"`` (default): a listed frame whose image (or mask) file is
            absent stops the load naming the file; ``"skip"``: such frames are dropped from the
            object's views and counted in one warning when the dataset is built (every manifest
            is read then, instead of lazily).
        distortion: ``"undistort"`` (default): frames with lens distortion keys are resampled
            with OpenCV onto the same pinhole ``K`` at load time (maps cached per camera);
            ``"error"``: such frames are refused, naming the keys. Unsupported lens models are
            refused either way.
        num_surface_points: with a ``mesh.ply`` in the object folder (``recon3d data
            render-meshes``), :meth:`load_geometry` also returns this many area-weighted surface
            samples with face normals (seeded by ``seed`` and the object index); 0: the mesh path only.
        seed: seed of those samples.

    ``load_views`` returns ``rgb (V, 3, H, W)``, ``alpha (V, 1, H, W)`` (from RGBA files or
    ``mask_path``; None for RGB files without masks) and OpenCV cameras ``(V,)``.
    """

    name = "Blender transforms.json dataset"

    def __init__(
        self,
        root: str,
        split: str = "train",
        scale: float = 1.0,
        missing_frames: Literal["error", "skip"] = "error",
        distortion: Literal["undistort", "error"] = "undistort",
        num_surface_points: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(root)
        self.split = str(split)
        self.scale = float(scale)
        if not math.isfinite(self.scale) or self.scale <= 0:
            raise DataError(self.root, f"scale: expected a positive number, got {scale!r}")
        if missing_frames not in ("error", "skip"):
            raise DataError(self.root, f"missing_frames: expected 'error' or 'skip', got {missing_frames!r}")
        if distortion not in ("undistort", "error"):
            raise DataError(self.root, f"distortion: expected 'undistort' or 'error', got {distortion!r}")
        self.missing_frames, self.distortion = missing_frames, distortion
        if isinstance(num_surface_points, bool) or int(num_surface_points) < 0:
            raise DataError(self.root, f"num_surface_points: expected an integer >= 0, got {num_surface_points!r}")
        self.num_surface_points, self.seed = int(num_surface_points), int(seed)
        if self._find_json(self.root) is not None:
            dirs = [self.root]
        else:
            dirs = [d for d in sorted(self.root.iterdir()) if d.is_dir() and self._find_json(d) is not None]
        self._set_objects(
            dirs, [d.name for d in dirs], f"transforms_{self.split}.json or transforms.json in it or in its sub-folders"
        )
        if self.missing_frames == "skip":
            self._report_skipped()

    def _report_skipped(self) -> None:
        # Read every manifest now so the count is known once, here, and not per object and
        # per worker as views are loaded.
        metas = [self._meta(i) for i in range(len(self))]
        skipped = [p for m in metas for p in m.skipped]
        if skipped:
            listed = sum(len(m.frames) + len(m.skipped) for m in metas)
            warnings.warn(
                f"{self.root}: skipped {len(skipped)} of {listed} frames listed in the transforms files "
                f"(image or mask file missing; missing_frames: skip), e.g. {skipped[0]}",
                stacklevel=3,
            )

    def _find_json(self, folder: Path) -> Path | None:
        for name in (f"transforms_{self.split}.json", "transforms.json"):
            if (folder / name).is_file():
                return folder / name
        return None

    # ------------------------------------------------------------------ parsing
    def _read_meta(self, index: int) -> _Meta:
        folder = self._dirs[index]
        path = self._find_json(folder)
        if path is None:
            raise DataError(folder / f"transforms_{self.split}.json", "file not found")
        data = read_json(path, "a transforms.json object with 'frames'")
        if not isinstance(data, dict):
            raise DataError(path, f"expected a JSON object with 'frames', got {type(data).__name__}")
        frames = data.get("frames")
        if not isinstance(frames, list):
            raise DataError(path, "expected a 'frames' list of {file_path, transform_matrix}")
        if not frames:
            raise DataError(path, "'frames' is empty; expected at least one view")
        top = {k: data[k] for k in _INTRINSIC_KEYS + LENS_KEYS if k in data}
        out, skipped = [], []
        for i, fr in enumerate(frames):
            if not isinstance(fr, dict):
                raise DataError(path, f"frames[{i}]: expected an object with file_path and transform_matrix")
            fp = fr.get("file_path")
            if not isinstance(fp, str) or not fp:
                raise DataError(path, f"frames[{i}].file_path: expected a non-empty string")
            image = self._image_path(path, folder, fp, i)
            mask = None
            if fr.get("mask_path") is not None:
                mp = fr["mask_path"]
                if not isinstance(mp, str) or not mp:
                    raise DataError(path, f"frames[{i}].mask_path: expected a non-empty string")
                mask = resolve_inside(folder, mp, f"frames[{i}].mask_path in {path.name}")
            extra = {}
            for key in ("depth_path", "normal_path"):
                if fr.get(key) is not None:
                    ep = fr[key]
                    if not isinstance(ep, str) or not ep:
                        raise DataError(path, f"frames[{i}].{key}: expected a non-empty string")
                    extra[key] = resolve_inside(folder, ep, f"frames[{i}].{key} in {path.name}")
            depth_scale = fr.get("depth_scale", data.get("depth_scale"))
            if "depth_path" in extra and (isinstance(depth_scale, bool) or not isinstance(depth_scale, (int, float))
                                          or not math.isfinite(depth_scale) or depth_scale <= 0):
                raise DataError(path, f"frame {i}: depth_path needs a positive 'depth_scale' (world units per 16-bit step), got {depth_scale!r}")
            m = fr.get("transform_matrix")
            try:
                c2w = np.asarray(m, dtype=np.float64)
            except (TypeError, ValueError):
                raise DataError(path, f"frames[{i}].transform_matrix: expected a 4x4 list of numbers") from None
            if c2w.shape not in ((4, 4), (3, 4)):
                raise DataError(path, f"frames[{i}].transform_matrix: expected shape (4, 4) or (3, 4), got {c2w.shape}")
            if not np.isfinite(c2w).all():
                raise DataError(path, f"frames[{i}].transform_matrix contains NaN or inf values")
            intr = dict(top)
            intr.update({k: fr[k] for k in _INTRINSIC_KEYS + LENS_KEYS if k in fr})
            for k in _INTRINSIC_KEYS:
                v = intr.get(k)
                if k in intr and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                    raise DataError(path, f"{k} (frame {i}): expected a finite number, got {v!r}")
            if "fl_x" not in intr and "camera_angle_x" not in intr:
                raise DataError(path, f"frame {i}: expected 'camera_angle_x' or 'fl_x' (focal length) at top level or in the frame")
            lens = parse_lens(intr, path, i)
            if lens is not None and self.distortion == "error":
                raise DataError(
                    path, f"frame {i}: lens distortion {lens.describe()}; set distortion: undistort to correct it at load time"
                )
            if self.missing_frames == "skip" and not (image.is_file() and (mask is None or mask.is_file())):
                skipped.append(image if not image.is_file() else mask)
                continue
            out.append(_Frame(image, mask, c2w, {k: intr[k] for k in _INTRINSIC_KEYS if k in intr}, lens,
                              extra.get("depth_path"), extra.get("normal_path"), depth_scale if "depth_path" in extra else None))
        if not out:
            raise DataError(path, f"none of the {len(frames)} listed frames has its image file on disk (missing_frames: skip)")
        return _Meta(path, out, skipped)

    def _image_path(self, json_path: Path, folder: Path, fp: str, i: int) -> Path:
        what = f"frames[{i}].file_path in {json_path.name}"
        p = resolve_inside(folder, fp, what)
        if p.is_file():
            return p
        for suf in _IMAGE_SUFFIXES:
            q = resolve_inside(folder, fp + suf, what)
            if q.is_file():
                return q
        return p  # load_image reports it missing

    # ------------------------------------------------------------------ interface
    def num_views(self, index: int) -> int:
        return len(self._meta(index).frames)

    def load_views(self, index: int, views: list[int]) -> RawViews:
        """Load ``views`` of object ``index``: rgb ``(V,3,H,W)``, alpha ``(V,1,H,W)`` or None, cameras ``(V,)``."""
        meta = self._meta(index)
        self._check_views(index, views)
        frames = [meta.frames[int(v)] for v in views]
        size = None
        if frames and "w" in frames[0].intr and "h" in frames[0].intr:
            size = (int(frames[0].intr["h"]), int(frames[0].intr["w"]))
        for f in frames:
            if not f.image.is_file():
                raise DataError(f.image, f"image file not found (listed in {meta.json_path.name}; missing_frames: skip drops such frames)")
        rgb, alpha = load_view_images([f.image for f in frames], size)
        H, W = rgb.shape[-2:]
        if any(f.mask is not None for f in frames):
            masks = []
            for f in frames:
                if f.mask is None:
                    raise DataError(meta.json_path, "some frames have mask_path and others not; expected all or none")
                masks.append(load_mask(f.mask, (H, W)))
            alpha = torch.stack(masks)
        depths, normals = self._load_depth_normals(meta, frames, (H, W))
        Ks, c2ws = [], []
        for f in frames:
            intr = f.intr
            if ("w" in intr and int(intr["w"]) != W) or ("h" in intr and int(intr["h"]) != H):
                raise DataError(f.image, f"expected image size {intr.get('w', W)}x{intr.get('h', H)} (WxH) from {meta.json_path.name}, got {W}x{H}")
            fx = float(intr["fl_x"]) if "fl_x" in intr else focal_from_fov(intr["camera_angle_x"], W, meta.json_path, "camera_angle_x")
            if "fl_y" in intr:
                fy = float(intr["fl_y"])
            elif "camera_angle_y" in intr:
                fy = focal_from_fov(intr["camera_angle_y"], H, meta.json_path, "camera_angle_y")
            else:
                fy = fx
            cx, cy = float(intr.get("cx", W / 2)), float(intr.get("cy", H / 2))
            Ks.append([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
            c2w = f.c2w_gl.copy()
            c2w[:3, 3] *= self.scale
            c2ws.append(c2w if c2w.shape == (4, 4) else np.concatenate([c2w, [[0.0, 0.0, 0.0, 1.0]]], 0))
        if any(f.lens is not None for f in frames):
            # Undistort after the mask is attached so colour and alpha stay registered.
            rgb, alpha = rgb.clone(), None if alpha is None else alpha.clone()
            for i, f in enumerate(frames):
                if f.lens is not None:
                    both = rgb[i] if alpha is None else torch.cat([rgb[i], alpha[i]], 0)
                    both = undistort(both, np.asarray(Ks[i]), f.lens)
                    rgb[i] = both[:3]
                    if alpha is not None:
                        alpha[i] = both[3:]
        c2w_t = torch.from_numpy(np.stack(c2ws) if c2ws else np.zeros((0, 4, 4))).float()
        K_t = torch.tensor(Ks, dtype=torch.float32).reshape(-1, 3, 3)
        cams = build_cameras(meta.json_path, lambda: Cameras.from_opengl(c2w_t, K_t, W, H))
        return RawViews(rgb=rgb, cameras=cams, alpha=alpha, depths=depths, normals=normals)

    def load_geometry(self, index: int) -> Geometry:
        """The object's ``mesh.ply`` (``recon3d data render-meshes``; world frame of the cameras) as
        ``mesh_paths`` and, with ``num_surface_points``, surface samples ``(N, 3)`` with face normals
        ``(N, 3)``; empty without the file. With ``scale != 1`` the samples are scaled and the path
        is left out (the file is in the unscaled frame)."""
        self._check_index(index)
        path = self._dirs[index] / "mesh.ply"
        if not path.is_file():
            return Geometry()
        pts = nrm = None
        if self.num_surface_points:
            pts, nrm = _sample_mesh_file(path, self.num_surface_points, self.seed * 1_000_003 + index)
            pts = pts * self.scale
        return Geometry(surface_points=pts, surface_normals=nrm, mesh_paths=[str(path)] if self.scale == 1.0 else None)

    @staticmethod
    def _load_depth_normals(meta: _Meta, frames: list[_Frame], size: tuple[int, int]):
        """``depths (V, 1, H, W)`` and ``normals (V, 3, H, W)``, each None when no frame has one."""
        out = []
        for key in ("depth", "normal"):
            paths = [getattr(f, key) for f in frames]
            if all(p is None for p in paths):
                out.append(None)
                continue
            if any(p is None for p in paths):
                raise DataError(meta.json_path, f"some frames have {key}_path and others not; expected all or none")
            maps = []
            for f, p in zip(frames, paths):
                v, _ = load_image(p, size)
                if key == "depth":
                    # load_image scales 16-bit PNGs by 1/65535: back to the stored integer, then to depth
                    maps.append(v[:1] * (DEPTH_PNG_MAX * f.depth_scale))
                else:
                    n = v * 2 - 1
                    norm = n.norm(dim=0, keepdim=True)
                    maps.append(torch.where(norm > 0.5, n / norm.clamp_min(1e-6), torch.zeros_like(n)))
            out.append(torch.stack(maps))
        return out[0], out[1]


def _sample_mesh_file(path: Path, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` area-weighted surface points ``(n, 3)`` and their face normals ``(n, 3)`` of a mesh file."""
    import trimesh

    try:
        m = trimesh.load(str(path), force="mesh", process=False)
    except Exception as e:  # noqa: BLE001 - trimesh raises many types for garbled files
        raise DataError(path, f"cannot read mesh ({type(e).__name__}); expected a PLY triangle mesh") from None
    v = torch.as_tensor(np.array(m.vertices), dtype=torch.float64)
    f = torch.as_tensor(np.array(m.faces), dtype=torch.int64)
    if f.numel() == 0:
        raise DataError(path, "mesh has no faces; expected a triangle mesh")
    tri = v[f]  # F, 3, 3
    cross = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area = cross.norm(dim=-1)
    if not float(area.sum()) > 0:
        raise DataError(path, "mesh has zero surface area; expected a triangle mesh")
    g = torch.Generator().manual_seed(seed)
    pick = torch.multinomial(area, n, replacement=True, generator=g)
    u, w = torch.rand(n, 1, generator=g, dtype=torch.float64), torch.rand(n, 1, generator=g, dtype=torch.float64)
    flip = (u + w) > 1  # fold the unit square onto the triangle: uniform barycentrics
    u, w = torch.where(flip, 1 - u, u), torch.where(flip, 1 - w, w)
    t = tri[pick]
    pts = t[:, 0] + u * (t[:, 1] - t[:, 0]) + w * (t[:, 2] - t[:, 0])
    nrm = cross[pick] / area[pick, None].clamp_min(1e-30)
    return pts.float(), nrm.float()


def write_blender(
    out_dir: str | Path,
    object_id: str,
    rgb: torch.Tensor,
    alpha: torch.Tensor | None,
    cameras: Cameras,
    split: str = "train",
    depths: torch.Tensor | None = None,
    normals: torch.Tensor | None = None,
    depth_scale: float | None = None,
    extra: dict | None = None,
) -> Path:
    """Write one object as a Blender/NeRF folder ``out_dir/object_id`` (atomic file writes).

    Args:
        rgb: ``(V, 3, H, W)`` straight colour in [0, 1].
        alpha: ``(V, 1, H, W)`` in [0, 1] (written as RGBA PNGs) or None (RGB PNGs).
        cameras: ``(V,)`` recon3d cameras; stored as OpenGL c2w with exact ``fl_x, fl_y, cx, cy, w, h``
            next to ``camera_angle_x`` (computed from the first camera).
        split: writes ``transforms_{split}.json`` and images under ``{split}/r_{i}.png``.
        depths: optional ``(V, 1, H, W)`` z-depth (0 = empty) → ``{split}/r_{i}_depth.png``, 16-bit,
            ``depth = stored integer x depth_scale`` (default ``depth_scale``: the largest depth /
            65535, so the range is used in full; quantisation ``depth_scale / 2``).
        normals: optional ``(V, 3, H, W)`` world unit normals (0 = empty) → ``{split}/r_{i}_normal.png``
            as 8-bit ``(n + 1) / 2``.
        extra: more top-level JSON keys (e.g. where the views come from).

    Returns the transforms JSON path.
    """
    V, H, W = check_writer_inputs(rgb, alpha, cameras)
    folder = Path(out_dir) / object_id
    gl = cameras.to_opengl().detach().double().cpu().numpy()
    K = cameras.K.detach().double().cpu().numpy()
    if depths is not None:
        check_shape(depths, f"{V} 1 {H} {W}", "depths")
        if depth_scale is None:
            depth_scale = max(float(depths.max()) if depths.numel() else 0.0, 1e-6) / DEPTH_PNG_MAX
    if normals is not None:
        check_shape(normals, f"{V} 3 {H} {W}", "normals")
    frames = []
    for i in range(V):
        img = rgb[i] if alpha is None else torch.cat([rgb[i], alpha[i]], 0)
        save_png(folder / split / f"r_{i}.png", to_uint8(img))
        frame = {
            "file_path": f"./{split}/r_{i}",
            "transform_matrix": gl[i].tolist(),
            "fl_x": float(K[i, 0, 0]), "fl_y": float(K[i, 1, 1]), "cx": float(K[i, 0, 2]), "cy": float(K[i, 1, 2]),
        }
        if depths is not None:
            q = (depths[i, 0].detach().double().cpu() / depth_scale).round().clamp(0, DEPTH_PNG_MAX)
            save_png(folder / split / f"r_{i}_depth.png", q.numpy().astype(np.uint16))
            frame["depth_path"] = f"./{split}/r_{i}_depth.png"
        if normals is not None:
            save_png(folder / split / f"r_{i}_normal.png", to_uint8((normals[i] + 1) / 2))
            frame["normal_path"] = f"./{split}/r_{i}_normal.png"
        frames.append(frame)
    data = {"camera_angle_x": float(cameras.fov_x.reshape(-1)[0]) if V else 0.0, "w": W, "h": H, "frames": frames}
    if depths is not None:
        data["depth_scale"] = float(depth_scale)
    data.update(extra or {})
    path = folder / f"transforms_{split}.json"
    write_json(path, data)
    return path
