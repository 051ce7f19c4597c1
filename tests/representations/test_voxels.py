"""SparseVoxels: packing, per-object slices, empty objects, validation, replace / to."""

from __future__ import annotations

import pytest
import torch

from recon3d.errors import ShapeError
from recon3d.representations import SparseVoxels


def _objects():
    g = torch.Generator().manual_seed(0)
    xyz = [torch.randint(0, 8, (n, 3), generator=g) for n in (3, 0, 5)]
    feats = [torch.randn(n, 4, generator=g) for n in (3, 0, 5)]
    return xyz, feats


def test_pack_split_round_trip_and_layout():
    xyz, feats = _objects()
    v = SparseVoxels.from_list(list(zip(xyz, feats)), resolution=8)
    assert v.batch_size == 3 and v.counts.tolist() == [3, 0, 5] and v.offsets.tolist() == [0, 3, 3]
    assert v.coords.dtype == torch.int32 and v.coords.is_contiguous() and v.coords.shape == (8, 4)
    assert v.coords[:, 0].tolist() == [0, 0, 0, 2, 2, 2, 2, 2]
    for i in range(3):
        one = v[i]
        assert one.batch_size == 1 and torch.equal(one.xyz(0).long(), xyz[i]) and torch.equal(one.feats, feats[i])
        assert one.coords[:, 0].eq(0).all()
    assert v[1].num_voxels == 0
    back = SparseVoxels.from_list(v.split())
    assert torch.equal(back.coords, v.coords) and torch.equal(back.feats, v.feats) and back.batch_size == 3


def test_trailing_empty_objects_need_batch_size():
    v = SparseVoxels(torch.tensor([[0, 1, 2, 3]]), torch.zeros(1, 2), 4, batch_size=3)
    assert v.counts.tolist() == [1, 0, 0] and v[2].num_voxels == 0
    assert SparseVoxels(torch.zeros(0, 4, dtype=torch.int32), torch.zeros(0, 2), 4).batch_size == 0


def test_checks_name_the_argument():
    f = torch.zeros(2, 3)
    with pytest.raises(ShapeError, match="contiguous and in batch order"):
        SparseVoxels(torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]), f, 4)
    with pytest.raises(ShapeError, match=r"coords: expected voxel indices in \[0, 4\)"):
        SparseVoxels(torch.tensor([[0, 0, 0, 4], [0, 0, 0, 0]]), f, 4)
    with pytest.raises(ShapeError, match="coords: expected integer"):
        SparseVoxels(torch.zeros(2, 4), f, 4)
    with pytest.raises(ShapeError, match="feats"):
        SparseVoxels(torch.zeros(2, 4, dtype=torch.int32), torch.zeros(3, 3), 4)
    with pytest.raises(ShapeError, match="coords"):
        SparseVoxels(torch.zeros(2, 3, dtype=torch.int32), f, 4)
    with pytest.raises(ShapeError, match="batch_size: expected an integer >= 2"):
        SparseVoxels(torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0]]), f, 4, batch_size=1)
    with pytest.raises(ShapeError, match="resolution"):
        SparseVoxels(torch.zeros(2, 4, dtype=torch.int32), f, 0)


def test_replace_and_to():
    xyz, feats = _objects()
    v = SparseVoxels.from_list(list(zip(xyz, feats)), resolution=8)
    w = v.replace(feats=v.feats * 2)
    assert torch.equal(w.feats, v.feats * 2) and torch.equal(w.coords, v.coords) and w.counts.tolist() == [3, 0, 5]
    with pytest.raises(ShapeError, match="feats"):
        v.replace(feats=torch.zeros(2, 4))
    d = v.to(torch.float64)
    assert d.feats.dtype == torch.float64 and d.coords.dtype == torch.int32
    # voxel centres in the cube: lo + (i + 0.5) * (hi - lo) / resolution
    torch.testing.assert_close(v.centers()[0], -1 + (v.coords[0, 1:].float() + 0.5) * 0.25)
