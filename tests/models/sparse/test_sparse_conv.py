"""Submanifold sparse conv against dense ``F.conv3d`` (forward and gradients), spconv's CPU build,
the neighbour map's two lookup paths, the cache, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.models.sparse.sparse_helpers import at_voxels, random_voxels, to_dense

from recon3d.errors import BackendUnavailableError, ShapeError
from recon3d.models.sparse import SparseLinear, SparseSubMConv3d, neighbour_map, submanifold_conv3d
from recon3d.models.sparse.hashing import spatial_cache
from recon3d.representations import SparseVoxels


def _dense_conv(v, feats, weight, bias, k):
    return at_voxels(F.conv3d(to_dense(v, feats), weight.permute(0, 4, 1, 2, 3), bias, padding=k // 2), v)


@pytest.mark.parametrize("k", [3, 1, 5])
def test_conv_equals_dense_conv3d_forward_and_gradients(k):
    v = random_voxels((0.15, 0.3, 0.05), resolution=10, channels=6, seed=k)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, k, k, k, 6, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    go = torch.randn(v.num_voxels, 5, generator=g, dtype=torch.float64)
    grads = []
    for fn in (lambda f, w_, b_: submanifold_conv3d(v.replace(feats=f), w_, b_, "torch"),
               lambda f, w_, b_: _dense_conv(v, f, w_, b_, k)):
        f_, w_, b_ = (t.clone().requires_grad_() for t in (v.feats, w, b))
        out = fn(f_, w_, b_)
        out.backward(go)
        grads.append((out, f_.grad, w_.grad, b_.grad))
    for a, r, what in zip(*grads, ("out", "d feats", "d weight", "d bias")):
        assert torch.allclose(a, r, atol=1e-10, rtol=0), what


def test_conv_float32_matches_dense_to_1e5():
    v = random_voxels((0.05,), resolution=32, channels=16, seed=3, dtype=torch.float32)
    conv = SparseSubMConv3d(16, 8, backend="torch")
    out = conv(v).feats
    ref = _dense_conv(v, v.feats, conv.conv.weight, conv.conv.bias, 3)
    assert (out - ref).abs().max() < 1e-5


def test_weight_layout_keys_and_kernel_axes():
    conv = SparseSubMConv3d(4, 3, 3)
    sd = conv.state_dict()
    assert set(sd) == {"conv.weight", "conv.bias"}
    assert sd["conv.weight"].shape == (3, 3, 3, 3, 4)
    # One voxel at (x, y, z) = (1, 1, 1) and one at x + 1: only tap (2, 1, 1) (offset +1 on column 1)
    # carries the neighbour into the first voxel's output (cross-correlation, no flip).
    coords = torch.tensor([[0, 1, 1, 1], [0, 2, 1, 1]], dtype=torch.int32)
    v = SparseVoxels(coords, torch.tensor([[0.0], [1.0]]), 4)
    w = torch.zeros(1, 3, 3, 3, 1)
    w[0, 2, 1, 1, 0] = 1.0
    out = submanifold_conv3d(v, w, None, "torch")
    assert out[:, 0].tolist() == [1.0, 0.0]


def test_table_and_sort_neighbour_maps_agree():
    v = random_voxels((0.2, 0.1), resolution=9, seed=4)
    a = neighbour_map(v, 3, method="table")
    b = neighbour_map(v, 3, method="sort")
    assert a.taps == b.taps and a.splits == b.splits
    assert torch.equal(a.out_idx, b.out_idx) and torch.equal(a.in_idx, b.in_idx)


def test_neighbour_map_is_cached_per_coordinate_set():
    v = random_voxels((0.2,), resolution=8, seed=5)
    conv1, conv2 = SparseSubMConv3d(8, 8), SparseSubMConv3d(8, 8)
    h = conv1(v)
    assert h.coords is v.coords  # replace(feats=...) keeps the coordinate tensor
    nm = spatial_cache(v.coords)[("neighbours", 3)]
    conv2(h)
    assert spatial_cache(h.coords)[("neighbours", 3)] is nm
    # a fresh (equal) coordinate tensor is a new set: no stale map
    assert ("neighbours", 3) not in spatial_cache(v.coords.clone())


def test_empty_objects_and_empty_batch():
    v = random_voxels((0.2, 0.0, 0.1), resolution=8, channels=4, seed=6, empty=(1,))
    assert v.counts[1] == 0
    conv = SparseSubMConv3d(4, 3).double()
    out = conv(v)
    ref = _dense_conv(v, v.feats, conv.conv.weight, conv.conv.bias, 3)
    assert torch.allclose(out.feats, ref)
    none = SparseVoxels(torch.zeros(0, 4, dtype=torch.int32), torch.zeros(0, 4, dtype=torch.float64), 8, 2)
    assert conv(none).feats.shape == (0, 3)


def test_sparse_linear_is_a_1x1_conv():
    v = random_voxels((0.2,), resolution=6, channels=5, seed=7, dtype=torch.float32)
    lin = SparseLinear(5, 4)
    conv = SparseSubMConv3d(5, 4, 1)
    with torch.no_grad():
        conv.conv.weight.copy_(lin.weight[:, None, None, None, :])
        conv.conv.bias.copy_(lin.bias)
    assert torch.allclose(lin(v).feats, conv(v).feats, atol=1e-6)


def test_bad_input_one_clear_line():
    v = random_voxels((0.2,), resolution=6, channels=4, seed=8)
    dup = SparseVoxels(torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]], dtype=torch.int32), torch.zeros(2, 4), 6)
    for method in ("table", "sort"):
        with pytest.raises(ShapeError, match=r"duplicate voxel \(x, y, z\) = \(1, 2, 3\) in object 0"):
            neighbour_map(dup, 3, method=method)
    with pytest.raises(ShapeError, match="coords: expected voxel indices in"):
        SparseVoxels(torch.tensor([[0, 6, 0, 0]]), torch.zeros(1, 4), 6)
    with pytest.raises(ShapeError, match="expected integer"):
        SparseVoxels(torch.tensor([[0, 1.5, 0, 0]]), torch.zeros(1, 4), 6)
    edited = v.replace(feats=v.feats)
    edited.coords[0, 1] = 99  # edited in place after validation
    with pytest.raises(ShapeError, match=r"expected voxel indices in \[0, 6\), got"):
        submanifold_conv3d(edited, torch.zeros(2, 3, 3, 3, 4, dtype=torch.float64))
    with pytest.raises(ShapeError, match="odd"):
        SparseSubMConv3d(4, 4, 2)
    with pytest.raises(ShapeError, match="expected 5 channels"):
        submanifold_conv3d(v, torch.zeros(2, 3, 3, 3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="sparse conv backend: expected one of"):
        submanifold_conv3d(v, torch.zeros(2, 3, 3, 3, 4, dtype=torch.float64), backend="torchsparse")


def test_spconv_cpu_build_equals_torch_on_the_same_weights():
    pytest.importorskip("spconv")
    v = random_voxels((0.05, 0.2, 0.0), resolution=24, channels=16, seed=9, dtype=torch.float32, empty=(2,))
    conv = SparseSubMConv3d(16, 12, backend="torch")
    ref = _dense_conv(v, v.feats, conv.conv.weight, conv.conv.bias, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the wrapper must keep spconv on one thread (it races with two)
    try:
        with torch.no_grad():
            ours = conv(v).feats
            conv.backend = "spconv"
            theirs = conv(v).feats
            again = conv(v.replace(feats=v.feats))  # the cached indice pairs
        assert torch.get_num_threads() == 2  # the wrapper restores the thread count
    finally:
        torch.set_num_threads(threads)
    assert (ours - ref).abs().max() < 1e-5
    assert (theirs - ref).abs().max() < 1e-5
    assert torch.equal(again.feats, theirs)
    # column-major coords (spconv alone returns garbage for them): the wrapper passes a contiguous copy
    col_major = v.coords.t().contiguous().t()
    assert not col_major.is_contiguous()
    with torch.no_grad():
        theirs_nc = conv(SparseVoxels(col_major, v.feats, v.resolution, v.batch_size)).feats
    assert (theirs_nc - ref).abs().max() < 1e-5
    with pytest.raises(BackendUnavailableError, match="forward-only"):
        conv(v.replace(feats=v.feats.requires_grad_()))


@pytest.mark.gpu
def test_spconv_cuda_equals_torch_forward_and_gradients():
    pytest.importorskip("spconv")
    v = random_voxels((0.05, 0.2), resolution=24, channels=16, seed=10, dtype=torch.float32).to("cuda")
    conv = SparseSubMConv3d(16, 12, backend="torch").cuda()
    res = []
    for backend in ("torch", "spconv"):
        conv.backend = backend
        conv.zero_grad()
        f = v.feats.clone().requires_grad_()
        out = conv(v.replace(feats=f)).feats
        out.square().sum().backward()
        res.append((out, f.grad, conv.conv.weight.grad.clone(), conv.conv.bias.grad.clone()))
    for a, b in zip(*res):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)


def test_registry_lists_the_sparse_backends_by_device():
    from recon3d.render.backends import backend_unusable, registered_backends

    libs = registered_backends()
    assert libs["spconv"].devices == ("cpu", "cuda")
    assert libs["flash_attn"].devices == ("cuda",) and libs["xformers"].devices == ("cuda",)
    if not torch.cuda.is_available():
        # a CPU-and-CUDA library is refused for CUDA tensors only
        assert backend_unusable("spconv", "cuda") == "no CUDA device"
        assert backend_unusable("flash_attn") is not None


def test_conv_under_cpu_bf16_autocast():
    v = random_voxels((0.2, 0.1), resolution=8, channels=16, seed=11, dtype=torch.float32)
    conv = SparseSubMConv3d(16, 8)
    ref = conv(v).feats
    f = v.feats.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(v.replace(feats=f)).feats
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 3e-2 * ref.abs().max()
    out.float().sum().backward()
    assert f.grad.dtype == torch.float32 and conv.conv.weight.grad.dtype == torch.float32
    assert torch.isfinite(conv.conv.weight.grad).all()
