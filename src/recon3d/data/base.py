"""The interface every dataset implements: objects, each with posed views and optional geometry.

A :class:`ObjectDataset` knows how to list its objects and load any subset of an object's views
in recon3d's conventions (``recon3d.data.cameras``). It does **not** choose which views are
inputs and which are supervision, resize, or batch: :class:`recon3d.data.datamodule.ReconDataModule`
does that the same way for every dataset.

Loaders convert at load time: images to float ``[0, 1]`` ``(V, 3, H, W)``, alpha to
``masks (V, 1, H, W)``, cameras to OpenCV c2w + pixel K. RGB is returned **not** composited;
the datamodule composites on the configured background, so every method sees one rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from recon3d.data.batch import Geometry
from recon3d.data.cameras import Cameras
from recon3d.errors import DataError

__all__ = ["RawViews", "ObjectDataset", "resolve_inside", "load_image"]


@dataclass
class RawViews:
    """Views of one object as loaded (unbatched): ``rgb (V,3,H,W)``, ``alpha (V,1,H,W)`` or None.

    ``rgb`` is straight (not premultiplied) colour; where ``alpha`` is None the images are
    already composited and carry no mask.
    """

    rgb: torch.Tensor
    cameras: Cameras
    alpha: torch.Tensor | None = None
    depths: torch.Tensor | None = None
    normals: torch.Tensor | None = None


class ObjectDataset(Dataset):
    """Base class of recon3d datasets: a list of objects, each with ``num_views(i)`` posed views.

    Subclasses implement :meth:`object_ids`, :meth:`num_views`, :meth:`load_views` and may
    implement :meth:`load_geometry`. ``__getitem__`` is not used by the datamodule (it calls
    ``load_views`` with the view indices it sampled); it returns all views for convenience.
    """

    #: Human-readable name used in error messages.
    name: str = "dataset"

    def object_ids(self) -> list[str]:
        raise NotImplementedError

    def num_views(self, index: int) -> int:
        raise NotImplementedError

    def load_views(self, index: int, views: list[int]) -> RawViews:
        raise NotImplementedError

    def load_geometry(self, index: int) -> Geometry:
        """Ground-truth geometry of object ``index``; empty by default."""
        return Geometry()

    def load_extras(self, index: int) -> dict[str, torch.Tensor]:
        """Dataset-specific tensors of object ``index`` (``Sample.extras``); none by default."""
        return {}

    def __len__(self) -> int:
        return len(self.object_ids())

    def __getitem__(self, index: int) -> RawViews:
        return self.load_views(index, list(range(self.num_views(index))))


def resolve_inside(root: str | Path, rel: str | Path, what: str = "path") -> Path:
    """``root / rel`` resolved, refusing anything that escapes ``root`` (``..``, absolute, symlinks)."""
    root_r = Path(root).resolve()
    p = (root_r / rel).resolve()
    if p != root_r and root_r not in p.parents:
        raise DataError(Path(root) / rel, f"{what} escapes the data root {root_r}; expected a path inside it")
    return p


def load_image(path: str | Path, expect_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read an 8/16-bit PNG/JPEG as ``rgb (3,H,W)`` and ``alpha (1,H,W)`` (or None) in ``[0, 1]``.

    Raises :class:`DataError` naming the file if it is missing, unreadable, of an unexpected
    channel count, or not of ``expect_size`` ``(H, W)``.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "image file not found")
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(path, f"cannot decode image ({type(e).__name__}: {e}); expected a PNG or JPEG") from None
    scale = 65535.0 if arr.dtype == np.uint16 else 255.0
    arr = arr.astype(np.float32) / scale
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, -1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise DataError(path, f"expected an RGB or RGBA image, got array shape {arr.shape}")
    if arr.shape[-1] in (1, 2):  # grey (+alpha)
        arr = np.concatenate([np.repeat(arr[..., :1], 3, -1), arr[..., 1:]], -1)
    if expect_size is not None and arr.shape[:2] != tuple(expect_size):
        raise DataError(path, f"expected image size {expect_size[1]}x{expect_size[0]} (WxH), got {arr.shape[1]}x{arr.shape[0]}")
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    return t[:3].contiguous(), (t[3:4].contiguous() if t.shape[0] == 4 else None)


def check_finite_array(arr: np.ndarray, path: str | Path, what: str) -> np.ndarray:
    """Raise :class:`DataError` naming ``path`` unless ``arr`` is finite."""
    if not np.isfinite(arr).all():
        raise DataError(path, f"{what} contains NaN or inf values")
    return arr


def fov_from_focal(focal: float, size: float) -> float:
    """Field of view in radians for a focal length in pixels across ``size`` pixels."""
    return 2 * math.atan(size / (2 * focal))
