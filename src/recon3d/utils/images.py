"""Image grids for logs and reports (PNG, written atomically)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from recon3d.utils.io import atomic_path

__all__ = ["save_view_grid", "to_uint8_hwc", "save_png"]


def to_uint8_hwc(img: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` float in [0, 1] → ``(H, W, 3)`` uint8."""
    return (img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def save_png(path: str | Path, img: torch.Tensor) -> Path:
    """Write a ``(3, H, W)`` image to ``path`` atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(to_uint8_hwc(img)).save(tmp, format="PNG")
    return Path(path)


def save_view_grid(path: str | Path, inputs: torch.Tensor, preds: torch.Tensor, targets: torch.Tensor, pad: int = 2) -> Path:
    """A grid with, per object, a row of inputs, a row of predictions and a row of targets.

    Args:
        inputs: ``(B, Vi, 3, H, W)``; preds, targets: ``(B, Vt, 3, h, w)``. Rows are resized to
            the target size and padded to the widest row.
    """
    import torch.nn.functional as F

    rows = []
    h, w = targets.shape[-2:]
    for b in range(targets.shape[0]):
        for views in (inputs[b], preds[b], targets[b]):
            v = F.interpolate(views.detach().float().cpu(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            v = F.pad(v, (pad, pad, pad, pad), value=0.5)
            rows.append(torch.cat(list(v), dim=2))
    width = max(r.shape[-1] for r in rows)
    rows = [F.pad(r, (0, width - r.shape[-1]), value=1.0) for r in rows]
    return save_png(path, torch.cat(rows, dim=1))
