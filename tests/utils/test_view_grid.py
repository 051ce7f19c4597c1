"""PNG view grids: views enlarged to >= 128 px with square pixels, labelled rows."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from recon3d.utils.images import save_view_grid


def test_grid_enlarges_views_exactly_and_labels_rows(tmp_path):
    g = torch.Generator().manual_seed(0)
    inputs = torch.rand(2, 3, 3, 64, 64, generator=g)
    preds, targets = torch.rand(2, 4, 3, 32, 32, generator=g), torch.rand(2, 4, 3, 32, 32, generator=g)
    path = save_view_grid(tmp_path / "g.png", inputs, preds, targets, pad=2, object_ids=["a", "b"])
    img = np.asarray(Image.open(path).convert("RGB"))
    rows, row_h, view = 6, 128 + 4, 128
    assert img.shape[0] == rows * row_h
    label_w = img.shape[1] - 4 * (view + 4)
    assert label_w > 20 and (img[:, :label_w] < 128).any()  # dark label text left of the views
    # prediction row of object 1, view 2: each render pixel becomes a 4x4 block (np.repeat reference)
    y0, x0 = 4 * row_h + 2, label_w + 2 * (view + 4) + 2
    ref = (preds[1, 2].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8).repeat(4, 0).repeat(4, 1)
    np.testing.assert_array_equal(img[y0 : y0 + view, x0 : x0 + view], ref)
    # the 64² inputs are shown at 128² too (nearest: 2x2 blocks)
    ref_in = (inputs[0, 0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8).repeat(2, 0).repeat(2, 1)
    np.testing.assert_array_equal(img[2 : 2 + view, label_w + 2 : label_w + 2 + view], ref_in)
