"""Sparse voxel operations on :class:`~recon3d.representations.SparseVoxels` (TRELLIS's layer set).

Pure torch (CPU and GPU) with optional libraries through :mod:`recon3d.render.backends`:

- :mod:`.conv`: :class:`SparseSubMConv3d` (submanifold conv, spconv's weight layout; backend
  ``spconv``), :class:`SparseLinear`;
- :mod:`.spatial`: :class:`SparseDownsample` (mean-pool), :class:`SparseUpsample` (through the
  paired downsample's record), :class:`SparseSubdivide`;
- :mod:`.norm`: :class:`SparseChannelLayerNorm`, :class:`SparseGroupNorm` (per object),
  :func:`modulate` / :func:`per_object` (``[B, C]`` vectors per object);
- :mod:`.attention`: :func:`varlen_attention` (backends ``flash_attn``, ``xformers``), full and
  shifted-window self-attention, cross-attention, :class:`SparseMultiHeadAttention`;
- :mod:`.hashing`: coordinate keys, the cached neighbour map, the per-coordinate-set cache.
"""

from recon3d.models.sparse.attention import (
    SparseMultiHeadAttention,
    SparseMultiHeadRMSNorm,
    sparse_cross_attention,
    sparse_self_attention,
    sparse_windowed_attention,
    swin_shift,
    varlen_attention,
    window_partition,
)
from recon3d.models.sparse.conv import SparseLinear, SparseSubMConv3d, has_spconv, submanifold_conv3d
from recon3d.models.sparse.hashing import neighbour_map, spatial_cache
from recon3d.models.sparse.norm import SparseChannelLayerNorm, SparseGroupNorm, modulate, per_object
from recon3d.models.sparse.spatial import SparseDownsample, SparseSubdivide, SparseUpsample, downsample, subdivide, upsample

__all__ = [
    "SparseSubMConv3d", "SparseLinear", "submanifold_conv3d", "has_spconv",
    "SparseDownsample", "SparseUpsample", "SparseSubdivide", "downsample", "upsample", "subdivide",
    "SparseChannelLayerNorm", "SparseGroupNorm", "modulate", "per_object",
    "varlen_attention", "window_partition", "swin_shift", "sparse_self_attention", "sparse_windowed_attention",
    "sparse_cross_attention", "SparseMultiHeadAttention", "SparseMultiHeadRMSNorm",
    "neighbour_map", "spatial_cache",
]
