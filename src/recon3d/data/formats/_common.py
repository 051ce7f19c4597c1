"""Shared pieces of the format readers and writers: guarded file reads, image stacks, PNG writes.

Every read here turns a library exception (json, numpy, PIL) into a one-line
:class:`~recon3d.errors.DataError` naming the file and what was expected, raised ``from None``.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from recon3d.data.base import ObjectDataset, check_finite_array, image_format_note, load_image, resolve_inside
from recon3d.data.cameras import Cameras
from recon3d.errors import DataError, ShapeError
from recon3d.utils.checks import check_shape
from recon3d.utils.io import atomic_path, atomic_write_text

__all__ = [
    "read_json", "load_npy", "load_npz_array", "build_cameras", "load_view_images", "check_writer_inputs",
    "save_png", "to_uint8", "read_uid_list", "FolderDataset",
]


def _shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def read_json(path: str | Path, what: str) -> object:
    """Parse a JSON file; a missing or garbled file is a :class:`DataError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"{what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(path, f"cannot parse JSON ({e.msg} at line {e.lineno} column {e.colno}); expected {what}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise DataError(path, f"cannot read {what} ({type(e).__name__}); expected a UTF-8 JSON file") from None


def _check_array(arr: np.ndarray, path: Path, what: str, shapes: Sequence[tuple[int, ...]]) -> np.ndarray:
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise DataError(path, f"{what}: expected a real numeric array, got dtype {arr.dtype}")
    if shapes and tuple(arr.shape) not in [tuple(s) for s in shapes]:
        want = " or ".join(_shape_str(s) for s in shapes)
        raise DataError(path, f"{what}: expected shape {want}, got {_shape_str(arr.shape)}")
    return check_finite_array(arr.astype(np.float64), path, what)


def load_npy(path: str | Path, what: str, shapes: Sequence[tuple[int, ...]] = ()) -> np.ndarray:
    """Load a ``.npy`` array (no pickles) as float64, checking its shape is one of ``shapes`` and finite."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"{what} file not found")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(path, f"cannot read {what} ({type(e).__name__}: {_first_line(e)}); expected a .npy array") from None
    if not isinstance(arr, np.ndarray):
        raise DataError(path, f"{what}: expected a single .npy array, got an archive")
    return _check_array(arr, path, what, shapes)


def load_npz_array(path: str | Path, key: str, what: str, check: Callable[[tuple[int, ...]], bool], want: str) -> np.ndarray:
    """Load ``key`` from a ``.npz`` archive as float64; ``check(shape)`` must hold (``want`` describes it)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"{what} file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            if key not in z.files:
                raise DataError(path, f"expected an array {key!r} ({want}), found keys {sorted(z.files)}")
            arr = z[key]
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, AttributeError) as e:
        raise DataError(path, f"cannot read {what} ({type(e).__name__}: {_first_line(e)}); expected a .npz archive") from None
    if not check(tuple(arr.shape)):
        raise DataError(path, f"{key}: expected shape {want}, got {_shape_str(arr.shape)}")
    return _check_array(arr, path, key, ())


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else ""


def build_cameras(path: str | Path, make: Callable[[], Cameras]) -> Cameras:
    """Call ``make()``; a :class:`ShapeError` (singular rotation, bad K) becomes a DataError naming ``path``."""
    try:
        return make()
    except ShapeError as e:
        raise DataError(path, f"invalid camera: {_first_line(e)}") from None


def load_view_images(
    paths: Sequence[Path],
    expect_size: tuple[int, int] | None = None,
    require_alpha: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Load images of one object as ``rgb (V, 3, H, W)`` and ``alpha (V, 1, H, W)`` or None.

    All images must share one size (``expect_size`` ``(H, W)`` when given, else the first
    image's) and either all carry alpha or none. ``require_alpha`` demands RGBA files. When some
    views carry alpha and others do not, the error names the odd ones out (the fewer; on a tie
    those without alpha) and says when a file's content is not the format of its name (a JPEG
    saved as ``.png`` has no alpha).
    """
    rgbs, alphas, with_alpha, without = [], [], [], []
    size = expect_size
    for p in paths:
        rgb, alpha = load_image(p, size)
        size = tuple(rgb.shape[-2:])
        if alpha is None and require_alpha:
            raise DataError(p, f"expected an RGBA image (4 channels: colour + alpha), got {_bands(p)}{image_format_note(p)}")
        rgbs.append(rgb)
        (with_alpha if alpha is not None else without).append(p)
        if alpha is not None:
            alphas.append(alpha)
    if with_alpha and without:
        if len(with_alpha) < len(without):
            odd, rest = with_alpha[0], without
            raise DataError(odd, f"has an alpha channel while {len(rest)} other view(s) of this object have none "
                            f"(e.g. {rest[0].name}); expected all RGB or all RGBA views")
        odd, rest = without[0], with_alpha
        raise DataError(odd, f"has no alpha channel{image_format_note(odd)} while {len(rest)} other view(s) of this object "
                        f"have one (e.g. {rest[0].name}); expected all RGB or all RGBA views")
    rgb = torch.stack(rgbs) if rgbs else torch.zeros(0, 3, *(expect_size or (1, 1)))
    return rgb, (torch.stack(alphas) if alphas else None)


def _bands(path: Path) -> str:
    """``"3 channel(s) (mode RGB)"``: the file's channels as stored, for messages."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            extra = " without transparency" if im.mode == "P" else ""
            return f"{len(im.getbands())} channel(s) (mode {im.mode}{extra})"
    except Exception:  # pragma: no cover - the file decoded a moment ago
        return "no alpha"


def load_mask(path: Path, expect_size: tuple[int, int]) -> torch.Tensor:
    """A mask image (grey, or alpha of RGBA, or first channel of RGB) as ``(1, H, W)`` in [0, 1]."""
    rgb, alpha = load_image(path, expect_size)
    return alpha if alpha is not None else rgb[:1]


def check_writer_inputs(rgb: torch.Tensor, alpha: torch.Tensor | None, cameras: Cameras) -> tuple[int, int, int]:
    """Check writer arguments: ``rgb (V,3,H,W)``, ``alpha (V,1,H,W)`` or None, ``cameras (V,)`` of size ``W x H``.

    Returns ``(V, H, W)``. Raises :class:`ShapeError`.
    """
    dims: dict = {}
    check_shape(rgb, "V 3 H W", "rgb", dims)
    if alpha is not None:
        check_shape(alpha, "V 1 H W", "alpha", dims)
    if tuple(cameras.batch_shape) != (dims["V"],):
        raise ShapeError(f"cameras: expected batch shape ({dims['V']},) to match rgb, got {tuple(cameras.batch_shape)}")
    if (cameras.width, cameras.height) != (dims["W"], dims["H"]):
        raise ShapeError(f"cameras: expected image size {dims['W']}x{dims['H']} to match rgb, got {cameras.width}x{cameras.height}")
    return dims["V"], dims["H"], dims["W"]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(C, H, W)`` float in [0, 1] → ``(H, W, C)`` uint8, rounded."""
    arr = x.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)
    return arr.permute(1, 2, 0).numpy()


def save_png(path: Path, arr: np.ndarray) -> None:
    """Write ``(H, W)`` / ``(H, W, C)`` uint8 (C in 1, 3, 4) as PNG atomically."""
    from PIL import Image

    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format="PNG")


def save_npy(path: Path, arr: np.ndarray) -> None:
    """Write one ``.npy`` array atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)


def write_json(path: Path, obj: object) -> None:
    """Write JSON atomically (indented, trailing newline)."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_uid_list(root: Path, manifest: Path, keys: Sequence[str] = ("good_objs",)) -> list[str]:
    """Object ids from a JSON manifest: a list of strings, or a dict holding one under ``keys``.

    Every id must name a folder inside ``root`` (ids that escape it are refused).
    """
    data = read_json(manifest, "a JSON list of object ids")
    if isinstance(data, dict):
        for k in keys:
            if k in data:
                data = data[k]
                break
    if not isinstance(data, list) or not all(isinstance(u, str) and u for u in data):
        want = "a JSON list of object id strings" + (f" (or a dict with key {keys[0]!r} holding one)" if keys else "")
        raise DataError(manifest, f"expected {want}")
    for u in data:
        resolve_inside(root, u, f"object id {u!r} in {manifest.name}")
    return list(data)


class FolderDataset(ObjectDataset):
    """A dataset whose objects are folders; subclasses fill ``self._dirs`` and ``self._ids``."""

    name = "folder dataset"

    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(self.root, f"{self.name} root folder not found")
        self._dirs: list[Path] = []
        self._ids: list[str] = []
        self._cache: dict[int, object] = {}

    def _set_objects(self, dirs: list[Path], ids: list[str], expected: str) -> None:
        if not dirs:
            raise DataError(self.root, f"no objects found; expected {expected}")
        self._dirs, self._ids = dirs, ids

    def object_ids(self) -> list[str]:
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self._ids):
            raise IndexError(f"object index {index} out of range for {len(self._ids)} objects")

    def _check_views(self, index: int, views: list[int]) -> None:
        n = self.num_views(index)
        bad = [v for v in views if not 0 <= int(v) < n]
        if bad:
            raise IndexError(f"view indices {bad} out of range for object {self._ids[index]!r} with {n} views")

    def _meta(self, index: int):
        self._check_index(index)
        if index not in self._cache:
            self._cache[index] = self._read_meta(index)
        return self._cache[index]

    def _read_meta(self, index: int):  # pragma: no cover - abstract
        raise NotImplementedError
