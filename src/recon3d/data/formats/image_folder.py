"""A folder of single images, one object per image, for single-image methods.

Layout::

    <root>/chair.png            # RGBA: the alpha channel is the object's mask
    <root>/table.jpg            # RGB: a mask from mask_dir, a colour-keyed background, or none
    <root>/masks/table.png      # optional mask_dir: grey (or the alpha / first channel) mask per image stem
    <root>/cameras.json         # optional: one camera per image (below)

Images are the files directly in ``root`` with an extension in ``extensions`` (``.png``,
``.jpg``, ``.jpeg`` by default), in name order; an object's id is the file's stem. Each object has
one view and no geometry. Its alpha comes from, in this order: the image's own alpha channel,
the mask file ``mask_dir/<stem>.png`` (when ``mask_dir`` is set, every RGB image must have one),
or a colour key when ``background`` ``[r, g, b]`` is set: a pixel is background (alpha 0) where
every channel lies within ``matte_tolerance`` of that colour, else foreground (alpha 1) — a hard
key for renders on a flat colour, not a soft matte. An RGB image with none of these carries no
mask (it is used as it is, already composited).

Cameras: without ``cameras_file`` the views are unposed (``Views.cameras`` is None; a method
that needs cameras says so through ``Batch.require("inputs.cameras")``). With it, the JSON maps
every image's file name to its camera::

    {"chair.png": {"c2w": [[...4x4 or 3x4...]], "K": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]],
                   "convention": "opencv", "projection": "perspective"}, ...}

``c2w`` is camera-to-world in ``convention`` ``"opencv"`` (default; recon3d's) or ``"opengl"``
(Blender: y up, z backward), ``K`` in pixels of the image as stored (orthographic: pixels per
world unit), ``projection`` ``"perspective"`` (default) or ``"orthographic"``.

Bad input: a file that cannot be decoded, a missing or wrongly sized mask, a garbled camera
file, a camera that is not a rotation — each a one-line :class:`~recon3d.errors.DataError` naming
the file, raised when that object loads (so the datamodule's ``on_bad_sample="skip"`` drops and
counts it); an empty folder or a stem used twice is refused at construction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from recon3d.data.base import ObjectDataset, RawViews, check_finite_array, load_image, resolve_inside
from recon3d.data.cameras import Cameras
from recon3d.data.formats._common import build_cameras, load_mask, read_json
from recon3d.errors import ConfigError, DataError

__all__ = ["ImageFolderDataset"]


class ImageFolderDataset(ObjectDataset):
    """Single images, one object per image (module docstring).

    Args:
        root: folder holding the images.
        mask_dir: optional folder (relative to ``root`` or absolute) of ``<stem>.png`` masks for
            the images that carry no alpha.
        background: ``[r, g, b]`` in [0, 1]: colour-key RGB images without a mask against it.
        matte_tolerance: largest per-channel distance to ``background`` still keyed out.
        cameras_file: optional JSON of one camera per image (relative to ``root`` or absolute).
        extensions: image file extensions to list (case-insensitive).

    ``load_views(i, [0])`` returns ``rgb (1, 3, H, W)``, ``alpha (1, 1, H, W)`` or None, and
    cameras ``(1,)`` or None.
    """

    name = "image folder dataset"

    def __init__(
        self,
        root: str,
        mask_dir: str | None = None,
        background: tuple[float, float, float] | None = None,
        matte_tolerance: float = 0.02,
        cameras_file: str | None = None,
        extensions: tuple[str, ...] = (".png", ".jpg", ".jpeg"),
    ) -> None:
        super().__init__()
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(self.root, f"{self.name} root folder not found")
        if background is not None:
            bg = list(background) if isinstance(background, (list, tuple)) else None
            if bg is None or len(bg) != 3 or not all(isinstance(c, (int, float)) and 0.0 <= c <= 1.0 for c in bg):
                raise ConfigError(f"background: expected [r, g, b] in [0, 1] (or null), got {background!r}")
            background = tuple(float(c) for c in bg)
        if not (isinstance(matte_tolerance, (int, float)) and 0.0 <= matte_tolerance < 1.0):
            raise ConfigError(f"matte_tolerance: expected a number in [0, 1), got {matte_tolerance!r}")
        self.background, self.matte_tolerance = background, float(matte_tolerance)
        exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
        files = sorted(p for p in self.root.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts)
        if not files:
            raise DataError(self.root, f"no images found; expected image files ({', '.join(sorted(exts))}) directly in the folder")
        stems: dict[str, Path] = {}
        for p in files:
            if p.stem in stems:
                raise DataError(p, f"the object id {p.stem!r} is also {stems[p.stem].name}; expected one image per name")
            stems[p.stem] = p
        self._files = files
        self.mask_dir = None if mask_dir is None else resolve_inside(self.root, mask_dir, "mask_dir")
        if self.mask_dir is not None and not self.mask_dir.is_dir():
            raise DataError(self.mask_dir, "mask folder not found (mask_dir)")
        self.cameras_file = None if cameras_file is None else resolve_inside(self.root, cameras_file, "cameras_file")
        self._cameras: dict | None = None

    def object_ids(self) -> list[str]:
        return [p.stem for p in self._files]

    def __len__(self) -> int:
        return len(self._files)

    def num_views(self, index: int) -> int:
        self._check_index(index)
        return 1

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self._files):
            raise IndexError(f"object index {index} out of range for {len(self._files)} images")

    def load_views(self, index: int, views: list[int]) -> RawViews:
        """The image of object ``index`` (``views`` must be ``[0]``, repeats allowed) as ``(V, ...)``."""
        self._check_index(index)
        if any(int(v) != 0 for v in views):
            raise IndexError(f"view indices {list(views)} out of range for image {self._files[index].name!r} with 1 view")
        path = self._files[index]
        rgb, alpha = load_image(path)
        size = tuple(rgb.shape[-2:])
        if alpha is None and self.mask_dir is not None:
            mask = self.mask_dir / f"{path.stem}.png"
            if not mask.is_file():
                raise DataError(mask, f"mask file not found for {path.name} (mask_dir); expected a grey PNG of {size[1]}x{size[0]}")
            alpha = load_mask(mask, size)
        elif alpha is None and self.background is not None:
            bg = torch.tensor(self.background).view(3, 1, 1)
            alpha = ((rgb - bg).abs().amax(0, keepdim=True) > self.matte_tolerance).float()
        cams = None if self.cameras_file is None else self._camera(path, size)
        n = len(views)
        return RawViews(
            rgb=rgb[None].expand(n, -1, -1, -1).clone(),
            cameras=None if cams is None else cams.reshape(1).to(torch.float32)[[0] * n],
            alpha=None if alpha is None else alpha[None].expand(n, -1, -1, -1).clone(),
        )

    # ------------------------------------------------------------------ cameras file
    def _camera(self, image: Path, size: tuple[int, int]) -> Cameras:
        if self._cameras is None:
            data = read_json(self.cameras_file, "a JSON object mapping image file names to cameras")
            if not isinstance(data, dict):
                raise DataError(self.cameras_file, "expected a JSON object mapping image file names to {c2w, K} cameras")
            self._cameras = data
        entry = self._cameras.get(image.name)
        if not isinstance(entry, dict):
            raise DataError(self.cameras_file, f"no camera for {image.name}; expected an entry {{\"c2w\": 4x4, \"K\": 3x3}} "
                            "for every image (or no cameras file)")
        where = f"{self.cameras_file}[{image.name!r}]"
        c2w = _matrix(entry.get("c2w"), where, "c2w", ((4, 4), (3, 4)))
        K = _matrix(entry.get("K"), where, "K", ((3, 3),))
        convention = entry.get("convention", "opencv")
        projection = entry.get("projection", "perspective")
        if convention not in ("opencv", "opengl"):
            raise DataError(where, f"convention: expected 'opencv' or 'opengl', got {convention!r}")
        if projection not in ("perspective", "orthographic"):
            raise DataError(where, f"projection: expected 'perspective' or 'orthographic', got {projection!r}")
        H, W = size
        c2w_t, K_t = torch.from_numpy(c2w).float()[None], torch.from_numpy(K).float()[None]
        if convention == "opengl":
            return build_cameras(where, lambda: Cameras.from_opengl(c2w_t, K_t, W, H, projection))
        if c2w_t.shape[-2] == 3:
            c2w_t = torch.cat([c2w_t, torch.tensor([[[0.0, 0.0, 0.0, 1.0]]])], -2)
        return build_cameras(where, lambda: Cameras(c2w_t, K_t, W, H, projection))


def _matrix(value: object, where: str, key: str, shapes: tuple[tuple[int, int], ...]) -> np.ndarray:
    want = " or ".join(f"{r}x{c}" for r, c in shapes)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(where, f"{key}: expected a {want} list of numbers, got {str(value)[:40]!r}") from None
    if value is None or tuple(arr.shape) not in shapes:
        raise DataError(where, f"{key}: expected a {want} list of numbers, got {'nothing' if value is None else f'shape {list(arr.shape)}'}")
    return check_finite_array(arr, where, key)
