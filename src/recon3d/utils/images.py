"""Image grids for logs and reports (PNG, written atomically)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from recon3d.utils.io import atomic_path

__all__ = ["save_view_grid", "to_uint8_hwc", "save_png", "GRID_ROWS"]


def to_uint8_hwc(img: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` float in [0, 1] → ``(H, W, 3)`` uint8."""
    return (img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def save_png(path: str | Path, img: torch.Tensor) -> Path:
    """Write a ``(3, H, W)`` image to ``path`` atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(to_uint8_hwc(img)).save(tmp, format="PNG")
    return Path(path)


#: Row labels of :func:`save_view_grid`, in order.
GRID_ROWS = ("inputs", "prediction", "target")


def save_view_grid(path: str | Path, inputs: torch.Tensor, preds: torch.Tensor, targets: torch.Tensor, pad: int = 2,
                   min_view_size: int = 128, object_ids: list[str] | None = None) -> Path:
    """A grid with, per object, a row of inputs, a row of predictions and a row of targets.

    Args:
        inputs: ``(B, Vi, 3, H, W)``; preds, targets: ``(B, Vt, 3, h, w)``. Every view is resized to
            the target's aspect with its longer side at least ``min_view_size`` pixels (nearest
            neighbour when enlarging, so a 32² render is shown as its pixels, not blurred), rows
            are padded to the widest row.
        object_ids: ``B`` names written beside each object's rows (with the row labels).
    """
    import torch.nn.functional as F
    from PIL import Image, ImageDraw, ImageFont

    h, w = targets.shape[-2:]
    scale = max(1, -(-min_view_size // max(h, w)))  # integer up-scaling keeps pixels square
    H, W = h * scale, w * scale
    rows = []
    for b in range(targets.shape[0]):
        for views in (inputs[b], preds[b], targets[b]):
            v = views.detach().float().cpu()
            if v.shape[-2:] != (H, W):
                big = v.shape[-2] > H or v.shape[-1] > W
                v = F.interpolate(v, size=(H, W), mode="bilinear" if big else "nearest", **({"antialias": True, "align_corners": False} if big else {}))
            v = F.pad(v, (pad, pad, pad, pad), value=0.5)
            rows.append(torch.cat(list(v), dim=2))
    width = max(r.shape[-1] for r in rows)
    rows = [F.pad(r, (0, width - r.shape[-1]), value=1.0) for r in rows]
    grid = to_uint8_hwc(torch.cat(rows, dim=1))
    font = ImageFont.load_default(size=max(12, H // 10))
    labels = []
    for b in range(targets.shape[0]):
        name = object_ids[b] if object_ids is not None and b < len(object_ids) else None
        labels += [f"{name}\n{GRID_ROWS[0]}" if name else GRID_ROWS[0], GRID_ROWS[1], GRID_ROWS[2]]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 8 + max(int(probe.multiline_textbbox((0, 0), t, font=font)[2]) for t in labels)
    canvas = Image.new("RGB", (label_w + grid.shape[1], grid.shape[0]), (255, 255, 255))
    canvas.paste(Image.fromarray(grid), (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    row_h = H + 2 * pad
    for i, text in enumerate(labels):
        box = draw.multiline_textbbox((0, 0), text, font=font)
        draw.multiline_text((4, i * row_h + (row_h - (box[3] - box[1])) // 2), text, fill=(0, 0, 0), font=font)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)
