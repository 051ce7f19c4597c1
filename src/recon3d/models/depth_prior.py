"""Offline monocular depth prior (Depth Anything via Hugging Face transformers) for M3D's depth stream.

The paper computes depth maps offline with a pre-trained model. :func:`compute_depth_cache` runs
``AutoModelForDepthEstimation`` + ``AutoImageProcessor`` loaded from a **local** directory
(``local_files_only=True``; nothing is downloaded) and writes one ``float32 (H, W)`` ``.npy`` per
image, resized to the image's size, atomically (a killed run never leaves a truncated file).
What is stored is the model's ``predicted_depth`` as is: *relative disparity* for the V1/V2
relative models (larger = nearer), metres for the metric models. The official M3D code stores
uint8 min-max disparity from Depth Anything V1; the loader normalises per image instead
(``DepthEncoder(normalize="minmax")``).

Cache layout: ``out_dir / <key>.npy``. A dataset passed in supplies ``(image_path, key)`` pairs
through ``depth_cache_items()``; a plain list of image paths uses each file's stem as its key.

Command line::

    python -m recon3d.models.depth_prior --model-dir <local Depth Anything dir> --out <cache dir> IMAGE...
    python -m recon3d.models.depth_prior --model-dir <dir> --out <cache dir> --front3d-root <root> --split <split.json>
"""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from recon3d.errors import CheckpointError, DataError
from recon3d.utils.io import atomic_write_bytes

__all__ = ["compute_depth_cache", "depth_cache_path", "load_cached_depth", "DEPTH_CACHE_COMMAND"]

#: The command named in errors about a missing cached depth.
DEPTH_CACHE_COMMAND = "recon3d data depth --model-dir <depth-anything dir> --out {out_dir} ..."


def depth_cache_path(out_dir: str | os.PathLike, key: str) -> Path:
    """Path of the cached depth of ``key`` (a relative, suffix-less name) under ``out_dir``."""
    rel = Path(key)
    if rel.is_absolute() or ".." in rel.parts:
        raise DataError(key, "depth cache key must be a relative path without '..'")
    return Path(out_dir) / rel.with_suffix(rel.suffix + ".npy") if rel.suffix else Path(out_dir) / f"{key}.npy"


def load_cached_depth(out_dir: str | os.PathLike, key: str, expect_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read the cached ``float32 (H, W)`` depth of ``key``; :class:`DataError` naming the command if missing."""
    path = depth_cache_path(out_dir, key)
    if not path.is_file():
        raise DataError(path, f"cached depth prior is missing; make it with: {DEPTH_CACHE_COMMAND.format(out_dir=out_dir)}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(path, f"cannot read cached depth ({e}); delete it and rerun: {DEPTH_CACHE_COMMAND.format(out_dir=out_dir)}") from None
    if arr.ndim != 2 or (expect_size is not None and arr.shape != tuple(expect_size)):
        raise DataError(path, f"expected a depth map of shape {expect_size or '(H, W)'}, got {arr.shape}; rerun the depth cache")
    if not np.isfinite(arr).all():
        raise DataError(path, "cached depth contains NaN or inf")
    return arr.astype(np.float32, copy=False)


def _items(source) -> list[tuple[Path, str]]:
    if hasattr(source, "depth_cache_items"):
        return [(Path(p), str(k)) for p, k in source.depth_cache_items()]
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    items = [(Path(p), Path(p).stem) for p in source]
    keys = [k for _, k in items]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:3]
        raise DataError(items[0][0].parent, f"image file stems must be unique to key the depth cache; duplicated: {dup}")
    return items


def _load_model(model_dir: str | os.PathLike, device: str | torch.device):
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(
            f"{model_dir}: no Depth Anything model here (config.json missing); download e.g. "
            "depth-anything/Depth-Anything-V2-Base-hf with `huggingface-cli download` on a machine with network and copy it here"
        )
    try:
        processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForDepthEstimation.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{model_dir}: cannot load a depth-estimation model ({e})") from None
    return processor, model.to(device).eval()


@torch.no_grad()
def compute_depth_cache(
    dataset_or_image_paths,
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    batch_size: int = 4,
    overwrite: bool = False,
) -> list[Path]:
    """Run Depth Anything on every image and cache ``float32 (H, W)`` depth per image.

    Args:
        dataset_or_image_paths: an object with ``depth_cache_items() -> [(image_path, key)]``
            (e.g. :class:`recon3d.data.formats.front3d.Front3DDataset`), or image paths.
        model_dir: local directory saved with ``save_pretrained`` (config, weights, preprocessor).
        out_dir: cache root.
        device: torch device for the model.
        batch_size: images per forward pass.
        overwrite: recompute existing entries (default: skip them, so an interrupted run resumes).

    Returns:
        the cache paths, one per image, in input order.
    """
    from PIL import Image

    items = _items(dataset_or_image_paths)
    paths = [depth_cache_path(out_dir, k) for _, k in items]
    todo = [(img, p) for (img, _), p in zip(items, paths) if overwrite or not p.is_file()]
    if not todo:
        return paths
    processor, model = _load_model(model_dir, device)
    sizes: dict[tuple[int, int], list[tuple[Path, Path]]] = {}
    for img, path in todo:  # batch images of one size together (the processor keeps aspect ratios)
        if not img.is_file():
            raise DataError(img, "image file not found")
        with Image.open(img) as im:
            sizes.setdefault(im.size, []).append((img, path))
    for group in sizes.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            images = []
            for img, _ in chunk:
                with Image.open(img) as im:
                    images.append(im.convert("RGB"))
            inputs = processor(images=images, return_tensors="pt").to(device)
            pred = model(**inputs).predicted_depth  # (b, h', w')
            for (_img, path), im, d in zip(chunk, images, pred):
                h, w = im.height, im.width
                d = torch.nn.functional.interpolate(d[None, None].float(), (h, w), mode="bicubic", align_corners=False)[0, 0]
                buf = io.BytesIO()
                np.save(buf, d.cpu().numpy().astype(np.float32), allow_pickle=False)
                atomic_write_bytes(path, buf.getvalue())
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry: ``python -m recon3d.models.depth_prior`` (see module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m recon3d.models.depth_prior", description="Cache Depth Anything depth priors.")
    ap.add_argument("--model-dir", required=True, help="local Depth Anything directory (save_pretrained layout)")
    ap.add_argument("--out", required=True, help="cache directory")
    ap.add_argument("--front3d-root", help="3D-FRONT (SSR layout) data root; with --split")
    ap.add_argument("--split", action="append", default=[], help="SSR split JSON(s) ([imgid, objid, class] entries)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("images", nargs="*", help="image files (keys = file stems)")
    a = ap.parse_args(argv)
    source: Iterable = a.images
    if a.front3d_root:
        from recon3d.data.formats.front3d import Front3DDataset

        source = Front3DDataset(a.front3d_root, a.split, depth_dir=a.out, require_depth=False)
    out = compute_depth_cache(source, a.model_dir, a.out, a.device, a.batch_size, a.overwrite)
    print(f"{len(out)} depth maps in {a.out}")


if __name__ == "__main__":
    main()
