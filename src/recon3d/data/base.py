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
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from recon3d.data.batch import Geometry
from recon3d.data.cameras import Cameras, fov_to_focal
from recon3d.errors import DataError

__all__ = ["RawViews", "ObjectDataset", "resolve_inside", "load_image", "image_format_note", "focal_from_fov"]


@dataclass
class RawViews:
    """Views of one object as loaded (unbatched): ``rgb (V,3,H,W)``, ``alpha (V,1,H,W)`` or None.

    ``rgb`` is straight (not premultiplied) colour; where ``alpha`` is None the images are
    already composited and carry no mask. ``cameras`` ``(V,)`` is None for unposed views (e.g.
    single images for a method that predicts or does not need cameras).
    """

    rgb: torch.Tensor
    cameras: Cameras | None
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
    """``root / rel`` resolved, refusing anything that escapes ``root`` (``..``, absolute, symlinks).

    A path that stays inside ``root`` as written but leaves it through a symbolic link is refused
    with a message that names the link and where it points.
    """
    root_r = Path(root).resolve()
    p = (root_r / rel).resolve()
    if p != root_r and root_r not in p.parents:
        lexical = Path(os.path.normpath(root_r / rel))
        if lexical == root_r or root_r in lexical.parents:
            link = _first_symlink(root_r, lexical)
            where = f"the symlink {link.relative_to(root_r)} -> {link.resolve()}" if link else f"a symlink (to {p})"
            raise DataError(Path(root) / rel, f"{what} leaves the data root {root_r} through {where}; "
                            "expected files inside the data root (copy them in, or point the root at their folder)")
        raise DataError(Path(root) / rel, f"{what} escapes the data root {root_r}; expected a path inside it")
    return p


def _first_symlink(root: Path, path: Path) -> Path | None:
    """The first component of ``path`` below ``root`` that is a symbolic link (None if none is)."""
    cur = root
    for part in path.relative_to(root).parts:
        cur = cur / part
        if cur.is_symlink():
            return cur
    return None


#: PIL modes read as they are (8-bit grey / grey+alpha / colour / colour+alpha).
_DIRECT_MODES = ("L", "LA", "RGB", "RGBA")
#: PIL modes converted by PIL to a direct one: bilevel (0/255), premultiplied alpha, padding byte,
#: other colour spaces (CMYK JPEGs, including Adobe's inverted ones, which PIL undoes). Palettes
#: (``P``, ``PA``) are handled in :func:`_image_array` (RGBA only when they carry transparency).
_CONVERT = {"1": "L", "La": "LA", "RGBa": "RGBA", "RGBX": "RGB", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB",
            "HSV": "RGB"}


def _png_header(path: Path) -> tuple[int, int] | None:
    """``(bit depth, colour type)`` from a PNG's IHDR chunk, or None if ``path`` is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _decode_16bit_colour_png(path: Path) -> np.ndarray:
    """A 16-bit RGB/RGBA PNG as ``uint16 (H, W, 3|4)`` RGB(A) (PIL reduces these to 8 bits)."""
    import cv2

    arr = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16 or arr.ndim != 3:
        raise ValueError("OpenCV could not decode the 16-bit colour PNG")
    return arr[..., [2, 1, 0, 3][: arr.shape[-1]]]


def _image_array(im, path: Path) -> tuple[np.ndarray, float]:
    """The pixels of PIL image ``im`` as ``(H, W)`` / ``(H, W, C)`` and the value of full scale.

    Every PIL mode is converted explicitly: palettes to RGB, or RGBA when they carry transparency
    (a ``tRNS`` chunk); bilevel ``1`` to 0/255; 16-bit grey (``I;16*``) and 32-bit integer ``I``
    (how PIL holds 16-bit data) on a 65535 scale; float ``F`` as it is (must lie in [0, 1]).
    """
    mode = im.mode
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if mode == "PA" or "transparency" in im.info else "RGB")
    elif mode in _CONVERT:
        im = im.convert(_CONVERT[mode])
    elif mode.startswith("I;16"):
        return np.asarray(im).astype(np.float32), 65535.0
    elif mode == "I":
        arr = np.asarray(im)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DataError(path, f"32-bit integer image with values in [{arr.min()}, {arr.max()}]; expected 8- or 16-bit data (0..65535)")
        return arr.astype(np.float32), 65535.0
    elif mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        if not np.isfinite(arr).all() or (arr.size and (arr.min() < -1e-6 or arr.max() > 1 + 1e-6)):
            raise DataError(path, f"float image with values outside [0, 1] (range [{np.nanmin(arr):.4g}, {np.nanmax(arr):.4g}]); "
                            "expected intensities in [0, 1]")
        return np.clip(arr, 0.0, 1.0), 1.0
    elif mode not in _DIRECT_MODES:
        raise DataError(path, f"unsupported image mode {mode!r}; expected a grey, RGB or RGBA PNG or JPEG")
    return np.asarray(im), 255.0


def load_image(path: str | Path, expect_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read a PNG/JPEG (8 or 16 bits, any PIL mode) as ``rgb (3,H,W)`` and ``alpha (1,H,W)`` (or
    None) in ``[0, 1]``.

    Modes are converted explicitly (see :func:`_image_array`): palette PNGs with transparency and
    grey+alpha images give an alpha, bilevel masks read 0/1, 16-bit PNGs are scaled by 1/65535
    (16-bit colour PNGs are decoded with OpenCV, since PIL keeps only 8 bits of them), CMYK
    JPEGs are converted to RGB. Grey images are repeated to 3 channels.

    Raises :class:`DataError` naming the file if it is missing, unreadable, of an unexpected
    channel count or mode, or not of ``expect_size`` ``(H, W)``.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "image file not found")
    try:
        with Image.open(path) as im:
            im.load()
            header = _png_header(path) if im.format == "PNG" else None
            if header is not None and header[0] == 16 and header[1] in (2, 6):  # 16-bit RGB / RGBA
                arr, scale = _decode_16bit_colour_png(path).astype(np.float32), 65535.0
            else:
                arr, scale = _image_array(im, path)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(path, f"cannot decode image ({type(e).__name__}: {e}); expected a PNG or JPEG") from None
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


def image_format_note(path: str | Path) -> str:
    """``" (it is a JPEG file despite its .png name)"`` when the file's content is not the format
    its extension says, else ``""`` (for messages about a file's channels)."""
    from PIL import Image

    path = Path(path)
    ext = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower())
    try:
        with Image.open(path) as im:
            fmt = im.format
    except Exception:
        return ""
    if ext is None or fmt is None or fmt == ext:
        return ""
    return f" (it is {'an' if fmt[0] in 'AEIOU' else 'a'} {fmt} file despite its {path.suffix} name)"


def focal_from_fov(fov: object, size: int, path: str | Path, key: str) -> float:
    """Focal length in pixels of a field of view ``fov`` (radians) across ``size`` pixels.

    Raises :class:`DataError` naming ``path`` and ``key`` unless ``0 < fov < pi`` (a zero angle
    would divide by zero, a straight angle gives no focal length).
    """
    if isinstance(fov, bool) or not isinstance(fov, (int, float)) or not (0.0 < float(fov) < math.pi):
        raise DataError(path, f"{key}: expected a field of view in (0, pi) radians, got {fov!r}")
    return fov_to_focal(float(fov), size)


def check_finite_array(arr: np.ndarray, path: str | Path, what: str) -> np.ndarray:
    """Raise :class:`DataError` naming ``path`` unless ``arr`` is finite."""
    if not np.isfinite(arr).all():
        raise DataError(path, f"{what} contains NaN or inf values")
    return arr


def fov_from_focal(focal: float, size: float) -> float:
    """Field of view in radians for a focal length in pixels across ``size`` pixels."""
    return 2 * math.atan(size / (2 * focal))
