"""Depth Anything prior cache from a tiny locally saved model (no download)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from recon3d.errors import CheckpointError, DataError
from recon3d.models.depth_prior import compute_depth_cache, load_cached_depth


def _save_tiny_depth_anything(path) -> None:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=56,
                            patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False)
    cfg = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                              fusion_hidden_size=16, head_hidden_size=8)
    DepthAnythingForDepthEstimation(cfg).save_pretrained(path)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14).save_pretrained(path)


def test_compute_depth_cache_from_image_paths(tmp_path):
    rng = np.random.default_rng(0)
    images = []
    for name, (h, w) in {"a.png": (20, 30), "b.jpg": (33, 17)}.items():
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(tmp_path / name)
        images.append(tmp_path / name)
    with pytest.raises(CheckpointError, match="config.json"):
        compute_depth_cache(images, tmp_path / "no-model", tmp_path / "cache")
    _save_tiny_depth_anything(tmp_path / "da")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = compute_depth_cache(images, tmp_path / "da", tmp_path / "cache", batch_size=2)
    assert [p.name for p in paths] == ["a.npy", "b.npy"]
    a, b = load_cached_depth(tmp_path / "cache", "a", (20, 30)), load_cached_depth(tmp_path / "cache", "b", (33, 17))
    assert a.dtype == np.float32 and np.isfinite(a).all() and np.isfinite(b).all()
    assert not list((tmp_path / "cache").glob(".*"))  # no temporary files left behind
    with pytest.raises(DataError, match=r"c\.npy.*recon3d data depth --model-dir"):
        load_cached_depth(tmp_path / "cache", "c")
