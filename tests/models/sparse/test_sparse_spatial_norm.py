"""Downsample / upsample / subdivide against dense references; LayerNorm, per-object GroupNorm and
modulation against torch's layers on each object's features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.models.sparse.sparse_helpers import at_voxels, random_voxels, to_dense

from recon3d.errors import ShapeError
from recon3d.models.sparse import (
    SparseChannelLayerNorm,
    SparseDownsample,
    SparseGroupNorm,
    SparseSubdivide,
    SparseSubMConv3d,
    SparseUpsample,
    modulate,
)
from recon3d.representations import SparseVoxels


def test_downsample_is_the_occupied_mean_pool():
    v = random_voxels((0.2, 0.05, 0.0), resolution=9, channels=5, seed=1, empty=(2,))
    d = SparseDownsample(2)(v)
    assert d.resolution == 5 and d.batch_size == 3
    # dense reference: sum-pool of features / sum-pool of occupancy (odd size: pad to 10 first)
    grid = F.pad(to_dense(v), (0, 1, 0, 1, 0, 1))
    occ = F.pad(to_dense(v, torch.ones(v.num_voxels, 1, dtype=torch.float64)), (0, 1, 0, 1, 0, 1))
    s, n = F.avg_pool3d(grid, 2) * 8, F.avg_pool3d(occ, 2) * 8
    occupied = (n[:, 0] > 0).nonzero()
    assert torch.equal(d.coords.long(), occupied)  # sorted by (batch, x, y, z)
    assert torch.allclose(d.feats, at_voxels(s / n.clamp_min(1), d))
    assert d.counts[2] == 0


def test_upsample_returns_to_the_paired_downsample_voxels():
    v = random_voxels((0.3, 0.1), resolution=8, channels=4, seed=2)
    down, up = SparseDownsample(2), SparseUpsample(2)
    d = down(v)
    d = SparseSubMConv3d(4, 4).double()(d)  # layers that keep the coords keep the record
    u = up(d)
    assert torch.equal(u.coords, v.coords) and u.resolution == 8
    # nearest neighbour: each fine voxel gets its parent cell's features
    parent = v.coords.clone()
    parent[:, 1:] //= 2
    dense_coarse = to_dense(d)
    c = parent.long()
    assert torch.equal(u.feats, dense_coarse.permute(0, 2, 3, 4, 1)[c[:, 0], c[:, 1], c[:, 2], c[:, 3]])
    # twice down then twice up
    dd = down(down(v))
    assert torch.equal(up(up(dd)).coords, v.coords)


def test_upsample_without_downsample_is_one_clear_error():
    v = random_voxels((0.3,), resolution=8, seed=3)
    with pytest.raises(ShapeError, match=r"SparseUpsample\(2\) needs the voxels made by its paired SparseDownsample\(2\)"):
        SparseUpsample(2)(v)
    with pytest.raises(ShapeError, match="no downsample record"):
        SparseUpsample(2)(SparseDownsample(2)(v).replace(coords=SparseDownsample(2)(v).coords.clone()))
    with pytest.raises(ShapeError, match="factor: expected an integer >= 2"):
        SparseDownsample(1)


def test_subdivide_equals_dense_nearest_upsampling():
    v = random_voxels((0.2, 0.1), resolution=5, channels=3, seed=4)
    s = SparseSubdivide()(v)
    assert s.resolution == 10 and s.num_voxels == 8 * v.num_voxels
    dense = to_dense(v).repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    occ = to_dense(v, torch.ones(v.num_voxels, 1, dtype=torch.float64))
    occ = occ.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    assert torch.equal(s.feats, at_voxels(dense, s))
    assert int(occ.sum()) == s.num_voxels and bool((at_voxels(occ, s) == 1).all())  # the children exactly
    assert torch.equal(s.coords[:8, 1:] // 2, v.coords[:1, 1:].expand(8, 3))  # a parent's children are consecutive


def test_group_norm_per_object_equals_torch_group_norm_on_each_object():
    v = random_voxels((0.3, 0.05, 0.0, 0.2), resolution=6, channels=64, seed=5, empty=(2,))
    gn = SparseGroupNorm(32, 64).double()
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    out = gn(v).feats
    ref = torch.nn.GroupNorm(32, 64).double()
    ref.load_state_dict(gn.state_dict())
    start = 0
    for n in v.counts.tolist():
        f = v.feats[start : start + n]
        if n:
            expect = ref(f.t()[None])[0].t()  # (1, C, n): statistics over this object's voxels
            assert torch.allclose(out[start : start + n], expect, atol=1e-10)
        start += n
    assert out.shape == v.feats.shape


def test_channel_layer_norm_and_modulation():
    v = random_voxels((0.3, 0.2), resolution=6, channels=8, seed=6, dtype=torch.float32)
    ln = SparseChannelLayerNorm(8)
    assert set(ln.state_dict()) == {"weight", "bias"}
    assert torch.allclose(ln(v).feats, F.layer_norm(v.feats, (8,)), atol=1e-6)
    scale, shift = torch.randn(2, 8), torch.randn(2, 8)
    m = modulate(v, scale, shift).feats
    n0 = int(v.counts[0])
    assert torch.allclose(m[:n0], v.feats[:n0] * (1 + scale[0]) + shift[0])
    assert torch.allclose(m[n0:], v.feats[n0:] * (1 + scale[1]) + shift[1])
    with pytest.raises(ShapeError, match=r"scale: expected one row per object \(2, \.\.\.\)"):
        modulate(v, torch.zeros(3, 8))


def test_spatial_ops_on_an_empty_batch():
    none = SparseVoxels(torch.zeros(0, 4, dtype=torch.int32), torch.zeros(0, 3), 8, 2)
    d = SparseDownsample(2)(none)
    assert d.num_voxels == 0 and SparseUpsample(2)(d).num_voxels == 0
    assert SparseSubdivide()(none).num_voxels == 0
    assert SparseGroupNorm(1, 3)(none).feats.shape == (0, 3)
