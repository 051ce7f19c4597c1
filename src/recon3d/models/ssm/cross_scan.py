"""Scanning 2-D feature maps as 1-D sequences along several directions (VMamba's cross-scan).

``cross_scan`` unrolls ``(B, C, H, W)`` into ``K`` sequences ``(B, K, C, H*W)``, in this order:

====  =====================================================
k     order of the pixels
====  =====================================================
0     row-major (left to right, top to bottom)
1     column-major (top to bottom, left to right)
2     row-major reversed
3     column-major reversed
====  =====================================================

``K = 1`` keeps only direction 0, ``K = 2`` directions 0 and 1, ``K = 4`` all four.
``cross_merge`` maps each sequence back to row-major pixel order and sums them, so
``cross_merge(cross_scan(x)) == K * x`` (flattened).
"""

from __future__ import annotations

import torch

from recon3d.errors import ShapeError
from recon3d.utils.checks import check_shape

__all__ = ["cross_scan", "cross_merge", "SCAN_DIRECTIONS"]

SCAN_DIRECTIONS = (1, 2, 4)


def _check_k(k: int) -> None:
    if k not in SCAN_DIRECTIONS:
        raise ShapeError(f"directions: expected one of {SCAN_DIRECTIONS}, got {k}")


def cross_scan(x: torch.Tensor, directions: int = 4) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, K, C, H*W)`` sequences in the orders listed in the module docstring."""
    check_shape(x, "B C H W", "x")
    _check_k(directions)
    rows = x.flatten(2)
    seqs = [rows]
    if directions >= 2:
        seqs.append(x.transpose(2, 3).flatten(2))
    if directions == 4:
        seqs += [rows.flip(-1), seqs[1].flip(-1)]
    return torch.stack(seqs, 1)


def cross_merge(y: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, K, C, H*W)`` sequences -> ``(B, C, H*W)``: undo each direction's order and sum."""
    check_shape(y, "B K C L", "y")
    k = y.shape[1]
    _check_k(k)
    if y.shape[-1] != height * width:
        raise ShapeError(f"y: expected sequence length H*W={height * width}, got {y.shape[-1]}")
    b, _, c, L = y.shape

    def from_cols(s: torch.Tensor) -> torch.Tensor:
        return s.view(b, c, width, height).transpose(2, 3).reshape(b, c, L)

    out = y[:, 0]
    if k >= 2:
        out = out + from_cols(y[:, 1])
    if k == 4:
        out = out + y[:, 2].flip(-1) + from_cols(y[:, 3].flip(-1))
    return out
