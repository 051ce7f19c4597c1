"""3D-FRONT in the layout of SSR (and InstPIFu/M3D): one sample per (image, object).

Layout under ``root`` (read from ``DaLi-Jack/SSR-code``, ``ssr/dataloader/front3d_dataloader.py``
and ``utils/sdf_util.py``). A split JSON lists ``[imgid, objid, class]`` entries, e.g.
``["test/rgb/000751_rgb_003848.jpeg", "7", "table"]``; the other files of an image are named by
replacing **every** ``rgb`` in ``imgid`` (SSR uses ``str.replace``)::

    test/rgb/000751_rgb_003848.jpeg              RGB, 484 x 648
    test/annotation/000751_annotation_003848.json
    test/mask/000751_mask_003848.npy.gz          amodal instance ids, padded by 100 px each side
    test/segm/000751_segm_003848.npy.gz          visible instance ids (not read here)
    test/depth/000751_depth_003848.npy.gz        float32 z-depth, invalid = 1e10 (> 1000)
    test/normal/000751_normal_003848.npy.gz      normals in [0, 1] (optional)
    <sdf_root>/<class>/<jid>/voxels.npy.gz       64^3 SDF grid, indexed [x, y, z]
    <sdf_root>/<class>/<jid>/spacing_centroid.json   spacing, padding, centroid, none_equal_scale

Annotation keys used: ``camera_pose_rot``/``camera_pose_tran`` (camera-to-world, **OpenGL/Blender
axes**: SSR flips camera y and z before applying it), ``camera_intrinsics`` (pixels), and
``obj_dict[objid]``: ``obj_id`` (``[id]``, the instance id in the mask), ``model_file_name``
(``[jid]``), ``obj_rot``, ``obj_tran`` (object-to-world), ``obj_scale`` (per-axis scene scale),
``bbox_2d``.

Coordinate chain (SSR): ``p_obj = world_to_obj(p_world)`` (inverse of ``[obj_rot | obj_tran]``),
``p_model = p_obj / obj_scale``, ``p_cube = (p_model - centroid) * none_equal_scale``; the grid is
sampled with ``grid_sample(align_corners=True)`` in ``(z, y, x)`` order.

Voxel-to-cube mapping, ``grid_mapping`` (see ``docs/front3d.md``). SSR's generator
(``mesh_to_voxels_padding``, spacing ``(extent + padding) / (R - 1)``) stores voxel ``j`` at cube
coordinate ``-1 + j * spacing`` with ``spacing = 2 / (R - 1)``: the grid spans the cube end to end,
and SSR's ``voxel_index2obj_coordinate`` maps indices to points the same way. SSR's lookup
(``voxel_index2grid_sample``) divides the index by ``R`` instead of ``R - 1``, so it reads voxel
``j`` at ``-1 + j * spacing * R / (R - 1)``: the field is stretched by ``R / (R - 1)`` away from
the cube's ``(-1, -1, -1)`` corner and the last voxel lands one step past the box. A surface point
at cube ``q`` appears at ``-1 + (q + 1) * R / (R - 1)`` (up to ``2 / (R - 1)`` ≈ 3 % of the cube
half-width, several cm for a bed), while the image, mask and depth show it at ``q``.

- ``"ssr"`` (default): SSR's lookup, reproduced as is: it defines the ground-truth SDF targets and
  the reference surfaces (``label_cube.ply``) behind the published numbers.
- ``"exact"``: voxel ``j`` read at ``-1 + j * spacing``: the SDF targets and surface agree with the
  RGB/mask/depth of the same sample (M3D's stage-2 losses), but not with SSR's evaluation surfaces.

SSR's near-surface samples are taken at ``-1 + j * spacing`` in both modes (as SSR does).

What a sample is in recon3d's conventions:

- **Frame**: the object frame ``p_obj`` (rigid, metric scene units, object at the origin). The
  camera is converted to OpenCV and moved into it: ``c2w = world_to_obj @ pose_gl @ diag(1,-1,-1,1)``.
- **Views**: one view, the full image ``(1, 3, H, W)``, ``alpha`` = the object's amodal mask,
  ``depths`` = rendered z-depth (0 where invalid).
- **Geometry**: ``sdf_points (S, 3)`` in the object frame (half uniform in the object's cube,
  half near the surface as SSR samples them), ``sdf_values (S,)`` from the grid; in cube units
  (``sdf_units="cube"``, what SSR's L1 loss compares) or object units (``"object"``: divided by
  ``mean(none_equal_scale)``, times ``mean(obj_scale)``, SSR's rendering rescale).
- **Extras** (:meth:`Front3DDataset.load_extras`): ``roi_box (4,)`` pixel box ``x0, y0, x1, y1``
  (from the amodal mask, SSR; or ``bbox_2d``), ``class_code (9,)`` one-hot, ``depth_prior
  (1, H, W)`` from the Depth Anything cache, ``cube_scale``/``cube_offset (3,)`` with
  ``p_cube = p_obj * cube_scale + cube_offset`` (the decoder's canonical frame), ``world_to_obj
  (4, 4)``; ``normals (3, H, W)`` in [-1, 1] as stored when ``load_normals``.

SSR's pixel ``u`` is the integer ``u`` (no half-pixel shift) with ``cx = W/2``; K is kept as stored,
so rays here go through pixel centres half a pixel from SSR's.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from recon3d.data.base import ObjectDataset, RawViews, load_image, resolve_inside
from recon3d.data.batch import Geometry
from recon3d.data.cameras import OPENGL_TO_OPENCV, Cameras
from recon3d.data.depth_cache import DEPTH_CACHE_COMMAND, depth_cache_path, load_cached_depth
from recon3d.errors import ConfigError, DataError, ShapeError
from recon3d.geometry import EmptySurfaceError, marching_cubes_fast, sample_surface

__all__ = ["Front3DDataset", "FRONT3D_CLASSES", "GRID_MAPPINGS", "sample_sdf_grid", "voxel_step", "MASK_PADDING"]

#: SSR's class order (``category_label_mapping``).
FRONT3D_CLASSES = ("table", "sofa", "cabinet", "night_stand", "chair", "bookshelf", "bed", "desk", "dresser")
#: Pixels of padding around the image in ``mask/*.npy.gz``.
MASK_PADDING = 100
INVALID_DEPTH = 1000.0


def _related(imgid: str, kind: str, suffix: str) -> str:
    stem = imgid.rsplit(".", 1)[0]
    return stem.replace("rgb", kind) + suffix


def _load_gz_npy(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(path, f"{what} file not found")
    try:
        with gzip.open(path, "rb") as f:
            return np.load(f, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(path, f"cannot read {what} as a gzipped .npy ({type(e).__name__}: {e})") from None


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise DataError(path, f"{what} file not found")
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(path, f"cannot parse {what} JSON ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(path, f"expected a JSON object in the {what}, got {type(obj).__name__}")
    return obj


def _mat(obj: dict, key: str, shape: tuple[int, ...], path: Path) -> np.ndarray:
    if key not in obj:
        raise DataError(path, f"missing key {key!r}")
    try:
        arr = np.asarray(obj[key], dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(path, f"{key!r}: expected numbers of shape {shape}") from None
    if arr.shape != shape or not np.isfinite(arr).all():
        raise DataError(path, f"{key!r}: expected finite numbers of shape {shape}, got shape {arr.shape}")
    return arr


#: Voxel-to-cube mappings of the SDF grid (module docstring).
GRID_MAPPINGS = ("ssr", "exact")


def voxel_step(spacing: torch.Tensor, resolution: int, mapping: str = "ssr") -> torch.Tensor:
    """Cube-coordinate distance between neighbouring voxels as ``mapping`` reads the grid.

    Voxel ``j`` sits at ``-1 + j * voxel_step``: ``spacing * R / (R - 1)`` for ``"ssr"``,
    ``spacing`` for ``"exact"``; ``spacing`` a scalar or ``(3,)`` tensor, same shape out.
    """
    if mapping not in GRID_MAPPINGS:
        raise ConfigError(f"grid mapping: expected one of {GRID_MAPPINGS}, got {mapping!r}")
    return spacing * resolution / (resolution - 1) if mapping == "ssr" else spacing


def sample_sdf_grid(voxels: torch.Tensor, cube_points: torch.Tensor, spacing: torch.Tensor, mapping: str = "ssr") -> torch.Tensor:
    """Trilinear lookup: ``voxels (R, R, R)`` indexed ``[x, y, z]``, ``cube_points (S, 3)`` -> ``(S,)``.

    ``"ssr"``: SSR's grid coordinate ``((p + 1) / spacing / R - 0.5) * 2`` (``utils/sdf_util.py``:
    ``obj_coordinate2voxel_index`` and ``voxel_index2grid_sample``), which reads voxel ``j`` at
    ``-1 + j * spacing * R / (R - 1)``. ``"exact"``: ``((p + 1) / spacing / (R - 1) - 0.5) * 2``,
    voxel ``j`` at ``-1 + j * spacing``, where SSR's generator put it (module docstring).
    Both: ``(z, y, x)`` order, border padding, ``align_corners=True``.
    """
    if mapping not in GRID_MAPPINGS:
        raise ConfigError(f"grid mapping: expected one of {GRID_MAPPINGS}, got {mapping!r}")
    r = voxels.shape[-1]
    # "ssr" keeps SSR's arithmetic operation for operation (index / R); "exact" divides by R - 1
    g = ((cube_points + 1.0) / spacing / (r if mapping == "ssr" else r - 1) - 0.5) * 2
    grid = g[:, [2, 1, 0]].view(1, 1, 1, -1, 3).to(voxels.dtype)
    out = F.grid_sample(voxels[None, None], grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.view(-1)


@dataclass
class _Item:
    imgid: str
    objid: str
    cname: str


class Front3DDataset(ObjectDataset):
    """Per-object samples of 3D-FRONT in SSR's layout (see module docstring).

    Args:
        root: data root holding the ``imgid`` paths (SSR's ``data_path``).
        split: split JSON path(s) (absolute or relative to ``root``) of ``[imgid, objid, class]``.
        sdf_root: root of ``<class>/<jid>/voxels.npy.gz`` (default ``root/gt-sdf``).
        depth_dir: Depth Anything cache (:mod:`recon3d.data.depth_cache`, made by ``recon3d data depth``); None: no prior.
        require_depth: raise when ``depth_dir`` is None or an image's cached depth is missing.
        num_sdf_points: SDF samples per object.
        near_surface_fraction: share of samples near the surface (voxels with ``|sdf| < 0.1``).
        surface_noise: std of the near-surface jitter, object-frame units (SSR: 0.0025).
        sdf_units: ``"cube"`` (SSR loss units) or ``"object"``.
        bbox_source: ``"mask"`` (SSR: box of the amodal mask inside the image) or ``"annotation"``.
        grid_resolution: expected SDF grid size ``R`` (SSR: 64).
        load_normals: also return stored normals in the extras.
        num_surface_points: also return this many ground-truth surface points with normals
            (``Geometry.surface_points/surface_normals``, object frame) for the geometry metrics,
            sampled area-weighted on the marching-cubes zero level set of the SDF grid (0: none).
            This is SSR's reference surface: its evaluation (``eval/evaluate_front3d.py``) scores
            ``pred_cube.ply`` against ``label_cube.ply``, which ``inference.py`` extracts from the
            ground-truth SDF grid (``get_surface_sliding(eval_gt=True)``: the 64^3 grid read
            trilinearly at 256^3, then marching cubes), not against the 3D-FUTURE mesh.
        surface_upsample: trilinear upsampling of the grid before marching cubes: 1 extracts on
            the 64^3 grid; 4 reads it at ``4 (R - 1) + 1`` points a side, SSR's 256^3 extraction
            (sub-voxel differences only; costs ~64x the memory and time per object).
        grid_mapping: how voxel indices map to cube coordinates, for the SDF targets and the
            surface samples alike (module docstring, ``docs/front3d.md``): ``"ssr"`` (default:
            SSR's lookup, the reference surfaces of the published numbers; the last voxel sits
            one step past the box, so the surface is up to ``2 / (R - 1)`` of the cube half-width
            off the image/mask/depth) or ``"exact"`` (voxel ``j`` at ``-1 + j * spacing``,
            consistent with the rendered views; not SSR's evaluation protocol).
        seed: base seed for SDF sampling (``load_geometry`` also takes a generator).
    """

    name = "front3d"

    def __init__(
        self,
        root: str,
        split: str | list[str],
        sdf_root: str | None = None,
        depth_dir: str | None = None,
        require_depth: bool = True,
        num_sdf_points: int = 4096,
        near_surface_fraction: float = 0.5,
        surface_noise: float = 0.0025,
        sdf_units: Literal["cube", "object"] = "cube",
        bbox_source: Literal["mask", "annotation"] = "mask",
        grid_resolution: int = 64,
        load_normals: bool = False,
        num_surface_points: int = 0,
        surface_upsample: int = 1,
        grid_mapping: Literal["ssr", "exact"] = "ssr",
        seed: int = 0,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(self.root, "3D-FRONT data root not found")
        self.sdf_root = Path(sdf_root) if sdf_root is not None else self.root / "gt-sdf"
        self.depth_dir = None if depth_dir is None else Path(depth_dir)
        self.require_depth = require_depth
        self.num_sdf_points, self.near_surface_fraction, self.surface_noise = num_sdf_points, near_surface_fraction, surface_noise
        if sdf_units not in ("cube", "object") or bbox_source not in ("mask", "annotation"):
            raise DataError(self.root, f"sdf_units must be 'cube'|'object' and bbox_source 'mask'|'annotation', got {sdf_units!r}, {bbox_source!r}")
        self.sdf_units, self.bbox_source = sdf_units, bbox_source
        self.grid_resolution, self.load_normals, self.seed = grid_resolution, load_normals, seed
        self.num_surface_points = int(num_surface_points)
        if int(surface_upsample) < 1:
            raise DataError(self.root, f"surface_upsample: expected an integer >= 1, got {surface_upsample!r}")
        self.surface_upsample = int(surface_upsample)
        if grid_mapping not in GRID_MAPPINGS:
            raise ConfigError(f"Front3DDataset grid_mapping: expected one of {GRID_MAPPINGS}, got {grid_mapping!r}")
        self.grid_mapping = grid_mapping
        self.items: list[_Item] = []
        for sp in [split] if isinstance(split, str) else list(split):
            path = Path(sp) if Path(sp).is_absolute() else self.root / sp
            if not path.is_file():
                raise DataError(path, "split file not found")
            try:
                entries = json.loads(path.read_text())
            except ValueError as e:
                raise DataError(path, f"cannot parse split JSON ({e})") from None
            for j, e in enumerate(entries if isinstance(entries, list) else [None]):
                if not (isinstance(e, list) and len(e) == 3 and all(isinstance(x, str) for x in e)):
                    raise DataError(path, f"entry {j}: expected [imgid, objid, class] strings, got {e!r}")
                if e[2] not in FRONT3D_CLASSES:
                    raise DataError(path, f"entry {j}: unknown class {e[2]!r}; expected one of {FRONT3D_CLASSES}")
                self.items.append(_Item(*e))
        if self.require_depth and self.depth_dir is None:
            raise DataError(self.root, "depth_dir is required (M3D's depth prior); pass it or set require_depth=False")

    # ------------------------------------------------------------------ interface
    def object_ids(self) -> list[str]:
        return [f"{it.imgid.rsplit('.', 1)[0]}#{it.objid}" for it in self.items]

    def num_views(self, index: int) -> int:
        return 1

    def depth_cache_items(self) -> list[tuple[Path, str]]:
        """``(image path, cache key)`` per distinct image, for ``recon3d data depth`` (:func:`recon3d.models.depth_prior.compute_depth_cache`)."""
        seen: dict[str, Path] = {}
        for it in self.items:
            if it.imgid not in seen:
                seen[it.imgid] = resolve_inside(self.root, it.imgid, "image")
        return [(p, k.rsplit(".", 1)[0]) for k, p in seen.items()]

    def _paths(self, it: _Item, kind: str, suffix: str) -> Path:
        return resolve_inside(self.root, _related(it.imgid, kind, suffix), kind)

    def _anno(self, it: _Item) -> tuple[dict, dict, Path]:
        path = self._paths(it, "annotation", ".json")
        anno = _read_json(path, "annotation")
        objs = anno.get("obj_dict")
        if not isinstance(objs, dict) or it.objid not in objs:
            raise DataError(path, f"obj_dict has no object {it.objid!r}")
        return anno, objs[it.objid], path

    def _world_to_obj(self, obj: dict, path: Path) -> np.ndarray:
        o2w = np.eye(4)
        o2w[:3, :3] = _mat(obj, "obj_rot", (3, 3), path)
        o2w[:3, 3] = _mat(obj, "obj_tran", (3,), path)
        try:
            return np.linalg.inv(o2w)
        except np.linalg.LinAlgError:
            raise DataError(path, "obj_rot is singular") from None

    def _cameras(self, anno: dict, w2o: np.ndarray, width: int, height: int, path: Path) -> Cameras:
        pose = np.eye(4)
        pose[:3, :3] = _mat(anno, "camera_pose_rot", (3, 3), path)
        pose[:3, 3] = _mat(anno, "camera_pose_tran", (3,), path)
        K = _mat(anno, "camera_intrinsics", (3, 3), path)
        c2w = torch.from_numpy(w2o @ pose).float() @ OPENGL_TO_OPENCV
        try:
            return Cameras(c2w[None], torch.from_numpy(K).float()[None], width, height)
        except ShapeError as e:
            raise DataError(path, f"bad camera: {e}") from None

    def _object_mask(self, it: _Item, obj: dict, height: int, width: int, path_anno: Path) -> tuple[np.ndarray, Path]:
        path = self._paths(it, "mask", ".npy.gz")
        m = _load_gz_npy(path, "instance mask")
        want = (height + 2 * MASK_PADDING, width + 2 * MASK_PADDING)
        if m.ndim not in (2, 3) or m.shape[:2] != want:
            raise DataError(path, f"expected a mask of shape {want} (+ optional channels), image {height}x{width} padded by {MASK_PADDING}, got {m.shape}")
        m = m[MASK_PADDING : MASK_PADDING + height, MASK_PADDING : MASK_PADDING + width]
        ids = obj.get("obj_id")
        if not (isinstance(ids, list) and ids):
            raise DataError(path_anno, f"obj_dict[{it.objid!r}].obj_id: expected [instance id]")
        hit = m == ids[0]
        return (hit.any(-1) if hit.ndim == 3 else hit), path

    def _roi_box(self, it: _Item, obj: dict, mask: np.ndarray, height: int, width: int, path_anno: Path, path_mask: Path) -> np.ndarray:
        if self.bbox_source == "mask":
            ys, xs = np.nonzero(mask)
            if len(xs) == 0:
                raise DataError(path_mask, f"object {it.objid} ({it.cname}) has no pixel inside the {width}x{height} image: its ROI lies outside the image")
            return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)
        box = _mat(obj, "bbox_2d", (4,), path_anno)
        x0, y0, x1, y1 = max(box[0], 0), max(box[1], 0), min(box[2], width), min(box[3], height)
        if x1 <= x0 or y1 <= y0:
            raise DataError(path_anno, f"object {it.objid}: bbox_2d {box.tolist()} lies outside the {width}x{height} image")
        return np.array([x0, y0, x1, y1], dtype=np.float32)

    def load_views(self, index: int, views: list[int]) -> RawViews:
        if list(views) != [0]:
            raise DataError(self.root, f"3D-FRONT samples have one view (index 0), asked for {list(views)}")
        it = self.items[index]
        rgb, _ = load_image(resolve_inside(self.root, it.imgid, "image"))
        height, width = rgb.shape[-2:]
        anno, obj, path = self._anno(it)
        cams = self._cameras(anno, self._world_to_obj(obj, path), width, height, path)
        mask, mask_path = self._object_mask(it, obj, height, width, path)
        self._roi_box(it, obj, mask, height, width, path, mask_path)
        dpath = self._paths(it, "depth", ".npy.gz")
        depth = None
        if dpath.is_file():
            d = _load_gz_npy(dpath, "depth").astype(np.float32)
            if d.shape != (height, width):
                raise DataError(dpath, f"expected depth of shape {(height, width)}, got {d.shape}")
            d = np.where((d > INVALID_DEPTH) | ~np.isfinite(d), 0.0, d)
            depth = torch.from_numpy(d)[None, None]
        return RawViews(rgb[None], cams, torch.from_numpy(mask.astype(np.float32))[None, None], depth)

    def load_extras(self, index: int) -> dict[str, torch.Tensor]:
        """Per-object extras (see module docstring): ROI box, class code, depth prior, cube transform."""
        it = self.items[index]
        img_path = resolve_inside(self.root, it.imgid, "image")
        rgb, _ = load_image(img_path)
        height, width = rgb.shape[-2:]
        anno, obj, path = self._anno(it)
        mask, mask_path = self._object_mask(it, obj, height, width, path)
        box = self._roi_box(it, obj, mask, height, width, path, mask_path)
        code = torch.zeros(len(FRONT3D_CLASSES))
        code[FRONT3D_CLASSES.index(it.cname)] = 1
        spacing, centroid, nes, scale, _ = self._sdf_meta(it, obj, path)
        out = {
            "roi_box": torch.from_numpy(box),
            "class_code": code,
            "cube_scale": torch.from_numpy(nes / scale).float(),
            "cube_offset": torch.from_numpy(-centroid * nes).float(),
            "world_to_obj": torch.from_numpy(self._world_to_obj(obj, path)).float(),
        }
        if self.depth_dir is not None:
            key = it.imgid.rsplit(".", 1)[0]
            if self.require_depth or depth_cache_path(self.depth_dir, key).is_file():
                make = (DEPTH_CACHE_COMMAND.format(out_dir=self.depth_dir).replace(" ...", "")
                        + f" --front3d-root {self.root} --split <split.json>")
                arr = load_cached_depth(self.depth_dir, key, (height, width), how_to_make=make)
                out["depth_prior"] = torch.from_numpy(arr)[None]
        if self.load_normals:
            npath = self._paths(it, "normal", ".npy.gz")
            n = _load_gz_npy(npath, "normal")
            if n.shape != (height, width, 3):
                raise DataError(npath, f"expected normals of shape {(height, width, 3)}, got {n.shape}")
            out["normals"] = torch.from_numpy(n.astype(np.float32) * 2 - 1).permute(2, 0, 1)
        return out

    def _sdf_meta(self, it: _Item, obj: dict, path: Path):
        jid = obj.get("model_file_name")
        if not (isinstance(jid, list) and jid and isinstance(jid[0], str)):
            raise DataError(path, f"obj_dict[{it.objid!r}].model_file_name: expected [jid]")
        folder = resolve_inside(self.sdf_root, Path(it.cname) / jid[0], "SDF folder")
        meta_path = folder / "spacing_centroid.json"
        meta = _read_json(meta_path, "SDF spacing/centroid")
        spacing = _mat(meta, "spacing", (), meta_path) if np.ndim(meta.get("spacing")) == 0 else _mat(meta, "spacing", (3,), meta_path)
        centroid = _mat(meta, "centroid", (3,), meta_path)
        nes = _mat(meta, "none_equal_scale", (3,), meta_path)
        scale = _mat(obj, "obj_scale", (3,), path)
        if (np.asarray(spacing) <= 0).any() or (nes <= 0).any() or (scale <= 0).any():
            raise DataError(meta_path, "spacing, none_equal_scale and obj_scale must be positive")
        return np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy(), centroid, nes, scale, folder

    def load_geometry(self, index: int, generator: torch.Generator | None = None) -> Geometry:
        """SDF samples of object ``index`` in the object frame (see module docstring)."""
        it = self.items[index]
        anno, obj, path = self._anno(it)
        spacing, centroid, nes, scale, folder = self._sdf_meta(it, obj, path)
        vpath = folder / "voxels.npy.gz"
        vox = _load_gz_npy(vpath, "SDF grid")
        r = self.grid_resolution
        if vox.shape != (r, r, r):
            raise DataError(vpath, f"expected an SDF grid of shape ({r}, {r}, {r}), got {vox.shape}")
        if not np.isfinite(vox).all():
            raise DataError(vpath, "SDF grid contains NaN or inf")
        g = generator if generator is not None else torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        voxels = torch.from_numpy(vox.astype(np.float32))
        sp, cen, ne, sc = (torch.from_numpy(a).float() for a in (spacing, centroid, nes, scale))
        n_near = int(round(self.num_sdf_points * self.near_surface_fraction))
        n_uni = self.num_sdf_points - n_near
        cube_uni = torch.rand(n_uni, 3, generator=g) * 2 - 1
        obj_pts = [(cube_uni / ne + cen) * sc]
        if n_near:
            idx = torch.nonzero(voxels.abs() < 0.1).float()
            if len(idx) == 0:
                raise DataError(vpath, "SDF grid has no voxel with |sdf| < 0.1 (no surface); expected an object inside the grid")
            pick = idx[torch.randint(len(idx), (n_near,), generator=g)]
            # SSR's voxel_index2obj_coordinate (voxel_range 1): where the generator put voxel j, in both mappings
            cube = pick * sp - 1.0
            obj_pts.append((cube / ne + cen) * sc + torch.randn(n_near, 3, generator=g) * self.surface_noise)
        pts = torch.cat(obj_pts)
        sdf = sample_sdf_grid(voxels, (pts / sc - cen) * ne, sp, self.grid_mapping)
        if self.sdf_units == "object":
            sdf = sdf / ne.mean() * sc.mean()
        geo = Geometry(sdf_points=pts, sdf_values=sdf)
        if self.num_surface_points:
            geo.surface_points, geo.surface_normals = self._surface_samples(voxels, sp, cen, ne, sc, vpath, g)
        return geo

    def _surface_samples(self, voxels, sp, cen, ne, sc, vpath: Path, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Area-weighted samples (object frame) on the grid's zero level set, where ``grid_mapping`` reads it."""
        r = voxels.shape[-1]
        # the box spanned by voxels 0 .. R-1 as sample_sdf_grid reads them (ssr: one step past +1)
        hi = (voxel_step(sp, r, self.grid_mapping) * (r - 1) - 1.0).tolist()
        if self.surface_upsample > 1:
            # align_corners=True keeps the original voxels as grid points: exact trilinear reads
            side = self.surface_upsample * (r - 1) + 1
            voxels = F.interpolate(voxels[None, None].float(), size=(side,) * 3, mode="trilinear", align_corners=True)[0, 0]
        try:
            verts, faces = marching_cubes_fast(voxels, torch.tensor([[-1.0, -1.0, -1.0], hi]))
        except EmptySurfaceError:
            raise DataError(vpath, "SDF grid has no zero level set (no surface to sample)") from None
        verts = (verts / ne + cen) * sc
        return sample_surface(verts, faces, self.num_surface_points, generator=g)
