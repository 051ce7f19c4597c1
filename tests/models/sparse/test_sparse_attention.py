"""Sparse attention against exact per-object / per-window references in float64, bad input, and
the CUDA varlen backends (gpu)."""

from __future__ import annotations

import pytest
import torch
from tests.models.sparse.sparse_helpers import random_voxels

from recon3d.errors import ShapeError
from recon3d.models.sparse import (
    SparseMultiHeadAttention,
    sparse_cross_attention,
    sparse_self_attention,
    sparse_windowed_attention,
    swin_shift,
    varlen_attention,
    window_partition,
)
from recon3d.representations import SparseVoxels


def _attend(q, k, v):
    """Plain softmax attention of one set: ``(n, H, D)`` x ``(m, H, D)`` -> ``(n, H, Dv)``."""
    s = torch.einsum("nhd,mhd->hnm", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("hnm,mhd->nhd", s.softmax(-1), v)


def _qkv(n, h=2, d=4, dv=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, h, d, generator=g, dtype=dtype), torch.randn(n, h, d, generator=g, dtype=dtype),
            torch.randn(n, h, dv, generator=g, dtype=dtype))


def test_full_attention_equals_per_object_attention():
    # object lengths in one bucket (padded + masked), alone in a bucket (a view), and empty
    v = random_voxels((0.05, 0.06, 0.3, 0.0), resolution=8, channels=1, seed=1, empty=(3,))
    q, k, w = _qkv(v.num_voxels)
    out = sparse_self_attention(v, q, k, w, backend="torch")
    start = 0
    for n in v.counts.tolist():
        sl = slice(start, start + n)
        if n:
            assert torch.allclose(out[sl], _attend(q[sl], k[sl], w[sl]), atol=1e-12)
        start += n


@pytest.mark.parametrize("lens", [[5, 7, 6, 8, 5, 0, 7], [6, 6, 6, 0, 6]])  # masked / equal lengths (no mask)
def test_chunked_masked_buckets_equal_the_reference(lens):
    q, k, v = _qkv(sum(lens), seed=2)
    out = varlen_attention(q, k, v, lens, backend="torch", score_budget=2 * 8 * 8)  # 1 segment per call
    full = varlen_attention(q, k, v, lens, backend="torch")
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        if n:
            assert torch.allclose(out[sl], _attend(q[sl], k[sl], v[sl]), atol=1e-12)
        start += n
    assert torch.allclose(out, full, atol=1e-12)


def _naive_windows(v: SparseVoxels, q, k, w, ws, shift):
    out = torch.zeros(q.shape[0], q.shape[1], w.shape[2], dtype=q.dtype)
    c = v.coords.long()
    win = torch.cat([c[:, :1], (c[:, 1:] + shift) // ws], 1)
    for key in {tuple(r) for r in win.tolist()}:
        rows = (win == torch.tensor(key)).all(1).nonzero()[:, 0]
        out[rows] = _attend(q[rows], k[rows], w[rows])
    return out


@pytest.mark.parametrize("block", [0, 1])
def test_windowed_attention_equals_a_naive_window_loop(block):
    v = random_voxels((0.3, 0.1, 0.0), resolution=13, channels=1, seed=3, empty=(2,))
    q, k, w = _qkv(v.num_voxels, seed=4)
    shift = swin_shift(block, 4)
    assert shift == 2 * block
    out = sparse_windowed_attention(v, q, k, w, window_size=4, shift=shift, backend="torch")
    assert torch.allclose(out, _naive_windows(v, q, k, w, 4, shift), atol=1e-12)
    # windows never cross objects and hold at most ws^3 voxels
    order, _, lens = window_partition(v, 4, shift)
    assert max(lens) <= 64 and sum(lens) == v.num_voxels


def test_swin_defaults_of_the_slat_vae():
    assert [swin_shift(i) for i in range(4)] == [0, 4, 0, 4]


def test_cross_attention_dense_and_sparse_context():
    v = random_voxels((0.1, 0.2), resolution=6, channels=1, seed=5)
    q, _, _ = _qkv(v.num_voxels, seed=6)
    g = torch.Generator().manual_seed(7)
    k, w = torch.randn(2, 5, 2, 4, generator=g, dtype=torch.float64), torch.randn(2, 5, 2, 3, generator=g, dtype=torch.float64)
    out = sparse_cross_attention(v, q, k, w, backend="torch")
    n0 = int(v.counts[0])
    assert torch.allclose(out[:n0], _attend(q[:n0], k[0], w[0]), atol=1e-12)
    assert torch.allclose(out[n0:], _attend(q[n0:], k[1], w[1]), atol=1e-12)
    with pytest.raises(ShapeError, match="segment 1 has .* queries but no keys"):
        sparse_cross_attention(v, q, k[0], w[0], kv_lens=[5, 0], backend="torch")


def test_attention_module_keys_and_reference():
    torch.manual_seed(0)
    v = random_voxels((0.1, 0.3), resolution=6, channels=8, seed=8, dtype=torch.float32)
    att = SparseMultiHeadAttention(8, 2, qk_rms_norm=True)
    assert set(att.state_dict()) == {"to_qkv.weight", "to_qkv.bias", "to_out.weight", "to_out.bias", "q_rms_norm.gamma", "k_rms_norm.gamma"}
    out = att(v).feats
    # reference: each object alone through the same module (a batch of one)
    for i, obj in enumerate(v.split()):
        start = int(v.offsets[i])
        assert torch.allclose(out[start : start + obj.num_voxels], att(obj).feats, atol=1e-5)
    cross = SparseMultiHeadAttention(8, 2, ctx_channels=6, type="cross")
    assert set(cross.state_dict()) >= {"to_q.weight", "to_kv.weight", "to_out.weight"}
    assert cross(v, torch.randn(2, 7, 6)).feats.shape == (v.num_voxels, 8)
    win = SparseMultiHeadAttention(8, 2, attn_mode="windowed", window_size=4, shift_window=2)
    assert win(v).feats.shape == (v.num_voxels, 8)


def test_bad_input():
    q, k, v = _qkv(6)
    with pytest.raises(ShapeError, match="expected sums 6 / 6"):
        varlen_attention(q, k, v, [3, 2])
    with pytest.raises(ShapeError, match="flash_attn' needs float16 or bfloat16"):
        varlen_attention(q, k, v, [6], backend="flash_attn")
    with pytest.raises(ShapeError, match="shift: expected an integer in"):
        window_partition(random_voxels((0.2,), resolution=4), 4, 4)
    with pytest.raises(ShapeError, match="num_heads: expected a divisor"):
        SparseMultiHeadAttention(8, 3)
    with pytest.raises(ShapeError, match="context: cross-attention needs a context"):
        SparseMultiHeadAttention(8, 2, type="cross")(random_voxels((0.2,), resolution=4, dtype=torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
def test_cuda_varlen_backends_equal_torch(backend):
    pytest.importorskip(backend if backend == "flash_attn" else "xformers.ops")
    lens, klens = [37, 0, 129, 5], [37, 0, 129, 5]
    q, k, v = (t.cuda().half() for t in _qkv(sum(lens), h=4, d=32, dv=32, seed=9))
    ref = varlen_attention(q.float(), k.float(), v.float(), lens, klens, backend="torch")
    out = varlen_attention(q, k, v, lens, klens, backend=backend)
    assert (out.float() - ref).abs().max() < 2e-3
    # cross: packed keys of other lengths
    kl = [11, 3, 64, 9]
    kk, vv = (t.cuda().half() for t in _qkv(sum(kl), h=4, d=32, dv=32, seed=10)[:2])
    ref = varlen_attention(q.float(), kk.float(), vv.float(), lens, kl, backend="torch")
    assert (varlen_attention(q, kk, vv, lens, kl, backend=backend).float() - ref).abs().max() < 2e-3
