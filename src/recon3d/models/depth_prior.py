"""Offline monocular depth prior (Depth Anything via Hugging Face transformers) for M3D's depth stream.

The paper computes depth maps offline with a pre-trained model. :func:`compute_depth_cache` runs
``AutoModelForDepthEstimation`` + ``AutoImageProcessor`` loaded from a **local** directory
(``local_files_only=True``; nothing is downloaded) and writes one ``float32 (H, W)`` ``.npy`` per
image, resized to the image's size, atomically (a killed run never leaves a truncated file).
What is stored is the model's ``predicted_depth`` as is: *relative disparity* for the V1/V2
relative models (larger = nearer), metres for the metric models. The official M3D code stores
uint8 min-max disparity from Depth Anything V1; the loader normalises per image instead
(``DepthEncoder(normalize="minmax")``).

Cache layout (:mod:`recon3d.data.depth_cache`, which datasets read without importing this
model): ``out_dir / <key>.npy``. A dataset passed in supplies ``(image_path, key)`` pairs through
``depth_cache_items()``; a plain list of image paths uses each file's stem as its key.

Command line: ``recon3d data depth`` (:mod:`recon3d.commands.data`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

from recon3d.data.depth_cache import DEPTH_CACHE_COMMAND, depth_cache_path, load_cached_depth
from recon3d.errors import CheckpointError, DataError
from recon3d.utils.checkpoint import load_hf_pretrained
from recon3d.utils.io import atomic_write_bytes

# The cache's path rule and reader live in the data layer; re-exported so callers of this module
# keep one import for "make and read the cache".
__all__ = ["compute_depth_cache", "depth_cache_path", "load_cached_depth", "DEPTH_CACHE_COMMAND"]


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
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{model_dir}: cannot load a depth-estimation model ({e})") from None
    # strict: transformers would only log weights the folder lacks and leave them random
    model = load_hf_pretrained(AutoModelForDepthEstimation, model_dir, "depth model")
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
