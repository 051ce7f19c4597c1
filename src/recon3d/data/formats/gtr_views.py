"""GTR's multi-view input folders (``snap-research/snap_gtr``).

Layout (facts from ``scripts/prepare_mv.py`` ``save_camera``/``read_camera`` and
``scripts/inference.py`` ``load_eval_data``)::

    <object>/rgb_000.png      # RGBA
    <object>/cam_000.txt      # text:
        extrinsic
        r00 r01 r02 t0        # world-to-camera 4x4, OpenCV axes (x right, y down, z forward)
        r10 r11 r12 t1
        r20 r21 r22 t2
        0 0 0 1

        intrinsic fx, fy, cx, cy, height, width
        fx fy cx cy H W       # pixels

Upstream takes ``c2w = inv(w2c)`` as its OpenCV pose (and flips columns 1, 2 only for
nvdiffrast), so the conversion is just the rigid inverse. The official renders are +Y up.
Header lines are skipped; a 3x4 extrinsic (18 numbers in all) is accepted too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recon3d.data.base import RawViews, check_finite_array
from recon3d.data.cameras import Cameras
from recon3d.data.formats._common import FolderDataset, build_cameras, check_writer_inputs, load_view_images, save_png, to_uint8
from recon3d.errors import DataError
from recon3d.utils.io import atomic_write_text

__all__ = ["GTRViewsDataset", "write_gtr_views", "read_gtr_camera"]

_EXPECTED = "a 4x4 world-to-camera matrix then 'fx fy cx cy H W' (22 numbers)"


def read_gtr_camera(path: str | Path) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Parse a ``cam_XXX.txt``: returns ``w2c (4, 4)`` (OpenCV), ``K (3, 3)`` pixels, ``height``, ``width``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "camera file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot read camera file ({type(e).__name__}); expected text with {_EXPECTED}") from None
    nums: list[float] = []
    for line in text.splitlines():
        toks = line.replace(",", " ").split()
        try:
            vals = [float(t) for t in toks]
        except ValueError:
            if nums and any(_is_num(t) for t in toks):
                raise DataError(path, f"malformed line {line.strip()!r}; expected {_EXPECTED}") from None
            continue  # a header line such as 'extrinsic'
        nums.extend(vals)
    if len(nums) not in (22, 18):
        raise DataError(path, f"expected {_EXPECTED}, got {len(nums)} numbers")
    arr = check_finite_array(np.array(nums, dtype=np.float64), path, "camera")
    ext, (fx, fy, cx, cy, h, w) = arr[:-6], arr[-6:]
    w2c = np.eye(4)
    w2c[: len(ext) // 4] = ext.reshape(-1, 4)
    if h != round(h) or w != round(w) or h <= 0 or w <= 0:
        raise DataError(path, f"expected a positive integer image size 'H W' at the end, got {h:g} {w:g}")
    K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=np.float64)
    return w2c, K, int(round(h)), int(round(w))


def _is_num(t: str) -> bool:
    try:
        float(t)
        return True
    except ValueError:
        return False


@dataclass
class _Meta:
    folder: Path
    stems: list[str]  # the XXX of rgb_XXX.png


class GTRViewsDataset(FolderDataset):
    """Folders of GTR inputs ``rgb_XXX.png`` (RGBA) + ``cam_XXX.txt``.

    Args:
        root: one object folder (holding ``rgb_*.png``) or a folder of such object folders.

    ``load_views`` returns ``rgb (V, 3, H, W)``, ``alpha (V, 1, H, W)`` (files must be RGBA) and
    OpenCV cameras ``(V,)``; images must have the size written in their camera files.
    """

    name = "GTR views dataset"

    def __init__(self, root: str) -> None:
        super().__init__(root)
        if any(self.root.glob("rgb_*.png")):
            dirs = [self.root]
        else:
            dirs = [d for d in sorted(self.root.iterdir()) if d.is_dir() and any(d.glob("rgb_*.png"))]
        self._set_objects(dirs, [d.name for d in dirs], "rgb_XXX.png + cam_XXX.txt files in it or in its sub-folders")

    def _read_meta(self, index: int) -> _Meta:
        folder = self._dirs[index]
        stems = sorted(p.name[len("rgb_"):-len(".png")] for p in folder.glob("rgb_*.png"))
        return _Meta(folder, stems)

    def num_views(self, index: int) -> int:
        return len(self._meta(index).stems)

    def load_views(self, index: int, views: list[int]) -> RawViews:
        """Load ``views`` of object ``index``: rgb ``(V,3,H,W)``, alpha ``(V,1,H,W)``, cameras ``(V,)``."""
        meta = self._meta(index)
        self._check_views(index, views)
        stems = [meta.stems[int(v)] for v in views]
        cams, size = [], None
        for s in stems:
            p = meta.folder / f"cam_{s}.txt"
            w2c, K, h, w = read_gtr_camera(p)
            if size is not None and (h, w) != size:
                raise DataError(p, f"expected image size {size[1]}x{size[0]} (WxH) like the other views, got {w}x{h}")
            size = (h, w)
            w2c_t, K_t = torch.from_numpy(w2c).float()[None], torch.from_numpy(K).float()[None]
            cams.append(build_cameras(p, lambda w2c_t=w2c_t, K_t=K_t, w=w, h=h: Cameras.from_w2c(w2c_t, K_t, w, h)))
        rgb, alpha = load_view_images([meta.folder / f"rgb_{s}.png" for s in stems], size, require_alpha=True)
        if cams:
            cameras = Cameras(torch.cat([c.c2w for c in cams]), torch.cat([c.K for c in cams]), cams[0].width, cams[0].height)
        else:
            cameras = Cameras(torch.zeros(0, 4, 4), torch.zeros(0, 3, 3), 1, 1)
        return RawViews(rgb=rgb, cameras=cameras, alpha=alpha)


def write_gtr_views(
    out_dir: str | Path,
    object_id: str,
    rgb: torch.Tensor,
    alpha: torch.Tensor | None,
    cameras: Cameras,
) -> Path:
    """Write one object as GTR input files under ``out_dir/object_id`` (atomic file writes).

    Args:
        rgb: ``(V, 3, H, W)``; alpha ``(V, 1, H, W)`` or None (opaque). Written as RGBA ``rgb_XXX.png``.
        cameras: ``(V,)``; written as ``cam_XXX.txt`` in upstream's text layout (OpenCV w2c, then
            ``fx fy cx cy H W``), with 10 significant digits instead of upstream's 6 decimals.

    Returns the object folder.
    """
    V, H, W = check_writer_inputs(rgb, alpha, cameras)
    folder = Path(out_dir) / object_id
    a = alpha if alpha is not None else torch.ones_like(rgb[:, :1])
    w2c = cameras.w2c.detach().double().cpu().numpy()
    K = cameras.K.detach().double().cpu().numpy()
    for i in range(V):
        save_png(folder / f"rgb_{i:03d}.png", to_uint8(torch.cat([rgb[i], a[i]], 0)))
        rows = "".join(" ".join(f"{x:.10g}" for x in w2c[i, r]) + "\n" for r in range(3))
        k = K[i]
        text = (
            "extrinsic\n" + rows + "0 0 0 1\n\n" + "intrinsic fx, fy, cx, cy, height, width \n"
            + f"{k[0, 0]:.10g} {k[1, 1]:.10g} {k[0, 2]:.10g} {k[1, 2]:.10g} {H} {W}\n"
        )
        atomic_write_text(folder / f"cam_{i:03d}.txt", text)
    return folder
