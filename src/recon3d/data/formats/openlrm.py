"""OpenLRM's Objaverse render layout (``3DTopia/OpenLRM``).

Layout (facts from ``openlrm/datasets/objaverse.py`` and ``scripts/data/objaverse/blender_script.py``)::

    <root>/<uid>/rgba/000.png ...     # RGBA renders
    <root>/<uid>/pose/000.npy ...     # (3, 4) c2w = Blender camera.matrix_world [R | t]  (OpenGL axes)
    <root>/<uid>/intrinsics.npy       # (3, 2) [[fx, fy], [cx, cy], [width, height]] in pixels
    <meta>.json                       # optional JSON list of uids

The pose is Blender's camera ``matrix_world`` (x right, y up, looking along -z), so
``c2w_cv = pose @ diag(1, -1, -1, 1)``. The world is Blender's (+Z up); renders normalise the
object to the box ``[-1, 1]^3`` and place cameras 1.9–2.6 from the origin. ``(4, 4)`` poses are
accepted too. Views are the ``pose/*.npy`` files in name order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recon3d.data.base import RawViews, resolve_inside
from recon3d.data.cameras import Cameras
from recon3d.data.formats._common import (
    FolderDataset,
    build_cameras,
    check_writer_inputs,
    load_npy,
    load_view_images,
    read_uid_list,
    save_npy,
    save_png,
    to_uint8,
)
from recon3d.errors import DataError, ShapeError

__all__ = ["OpenLRMDataset", "write_openlrm"]


@dataclass
class _Meta:
    folder: Path
    stems: list[str]


class OpenLRMDataset(FolderDataset):
    """Objects rendered in OpenLRM's ``<uid>/{rgba,pose,intrinsics.npy}`` layout.

    Args:
        root: folder holding one sub-folder per uid.
        meta_file: optional JSON list of uids (relative to ``root`` or absolute); without it every
            sub-folder holding ``intrinsics.npy`` is an object, in name order.

    ``load_views`` returns ``rgb (V, 3, H, W)``, ``alpha (V, 1, H, W)`` (the files must be RGBA)
    and OpenCV cameras ``(V,)``; the images must have the size stored in ``intrinsics.npy``.
    """

    name = "OpenLRM render dataset"

    def __init__(self, root: str, meta_file: str | None = None) -> None:
        super().__init__(root)
        if meta_file is not None:
            ids = read_uid_list(self.root, self.root / meta_file)
            dirs = [resolve_inside(self.root, u, "uid") for u in ids]
        else:
            dirs = [d for d in sorted(self.root.iterdir()) if d.is_dir() and (d / "intrinsics.npy").is_file()]
            ids = [d.name for d in dirs]
        self._set_objects(dirs, ids, "sub-folders <uid>/ with rgba/NNN.png, pose/NNN.npy and intrinsics.npy")

    def _read_meta(self, index: int) -> _Meta:
        folder = self._dirs[index]
        pose_dir = folder / "pose"
        stems = sorted(p.stem for p in pose_dir.glob("*.npy")) if pose_dir.is_dir() else []
        if not stems:
            raise DataError(pose_dir, "no views found; expected pose/NNN.npy camera files")
        return _Meta(folder, stems)

    def num_views(self, index: int) -> int:
        return len(self._meta(index).stems)

    def load_views(self, index: int, views: list[int]) -> RawViews:
        """Load ``views`` of object ``index``: rgb ``(V,3,H,W)``, alpha ``(V,1,H,W)``, cameras ``(V,)``."""
        meta = self._meta(index)
        self._check_views(index, views)
        ipath = meta.folder / "intrinsics.npy"
        intr = load_npy(ipath, "intrinsics [[fx, fy], [cx, cy], [w, h]]", [(3, 2)])
        W, H = int(round(intr[2, 0])), int(round(intr[2, 1]))
        if W <= 0 or H <= 0 or abs(intr[2, 0] - W) > 1e-3 or abs(intr[2, 1] - H) > 1e-3:
            raise DataError(ipath, f"expected a positive integer image size in row 2 [w, h], got {intr[2].tolist()}")
        stems = [meta.stems[int(v)] for v in views]
        rgb, alpha = load_view_images([meta.folder / "rgba" / f"{s}.png" for s in stems], (H, W), require_alpha=True)
        poses = []
        for s in stems:
            p = meta.folder / "pose" / f"{s}.npy"
            pose = load_npy(p, "camera pose (c2w)", [(3, 4), (4, 4)])
            try:
                poses.append(Cameras.from_opengl(torch.from_numpy(pose)[None].float(), torch.eye(3)[None], W, H).c2w[0])
            except ShapeError as e:
                raise DataError(p, f"invalid camera pose: {e}") from None
        K = torch.tensor([[intr[0, 0], 0, intr[1, 0]], [0, intr[0, 1], intr[1, 1]], [0, 0, 1]], dtype=torch.float32)
        c2w = torch.stack(poses) if poses else torch.zeros(0, 4, 4)
        cams = build_cameras(ipath, lambda: Cameras(c2w, K.expand(len(stems), 3, 3).clone(), W, H))
        return RawViews(rgb=rgb, cameras=cams, alpha=alpha)


def write_openlrm(
    out_dir: str | Path,
    object_id: str,
    rgb: torch.Tensor,
    alpha: torch.Tensor | None,
    cameras: Cameras,
) -> Path:
    """Write one object in OpenLRM's layout under ``out_dir/object_id`` (atomic file writes).

    Args:
        rgb: ``(V, 3, H, W)`` straight colour in [0, 1].
        alpha: ``(V, 1, H, W)`` or None (then fully opaque); always written as RGBA ``rgba/NNN.png``.
        cameras: ``(V,)`` cameras sharing one K (the layout stores a single ``intrinsics.npy``);
            poses are written as ``(3, 4)`` OpenGL c2w ``pose/NNN.npy``.

    Returns the object folder. Raises :class:`ShapeError` if the cameras' intrinsics differ.
    """
    V, H, W = check_writer_inputs(rgb, alpha, cameras)
    K = cameras.K.detach().double().cpu().reshape(-1, 3, 3)
    if V and not torch.allclose(K, K[:1].expand_as(K), rtol=1e-6, atol=1e-6):
        raise ShapeError("cameras: the OpenLRM layout stores one intrinsics.npy per object; expected equal K for all views")
    folder = Path(out_dir) / object_id
    gl = cameras.to_opengl().detach().double().cpu().numpy()
    a = alpha if alpha is not None else torch.ones_like(rgb[:, :1])
    for i in range(V):
        save_png(folder / "rgba" / f"{i:03d}.png", to_uint8(torch.cat([rgb[i], a[i]], 0)))
        save_npy(folder / "pose" / f"{i:03d}.npy", gl[i, :3, :4])
    k = K[0].numpy() if V else np.eye(3)
    save_npy(folder / "intrinsics.npy", np.array([[k[0, 0], k[1, 1]], [k[0, 2], k[1, 2]], [W, H]], dtype=np.float64))
    return folder
