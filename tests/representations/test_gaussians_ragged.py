"""Gaussians: dense and packed (ragged) layouts, packing/splitting round trips, N = 0 objects, checks."""

from __future__ import annotations

import pytest
import torch

from recon3d.data.cameras import orbit_cameras
from recon3d.errors import ShapeError
from recon3d.representations import Gaussians


def _dense(B=2, N=5, seed=0, sh_degree=None):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g)
    colors = r(B, N, 3) if sh_degree is None else torch.randn(B, N, (sh_degree + 1) ** 2, 3, generator=g) * 0.2
    return Gaussians((r(B, N, 3) - 0.5) * 0.8, torch.randn(B, N, 4, generator=g), r(B, N, 3) * 0.05 + 0.02, r(B, N) * 0.8 + 0.1, colors, sh_degree)


def _packed(counts, seed=1):
    T = sum(counts)
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g)
    return Gaussians((r(T, 3) - 0.5) * 0.8, torch.randn(T, 4, generator=g), r(T, 3) * 0.05 + 0.02, r(T) * 0.8 + 0.1, r(T, 3), counts=counts)


def _same(a: Gaussians, b: Gaussians) -> None:
    assert a.is_packed == b.is_packed and a.sh_degree == b.sh_degree
    assert torch.equal(a.counts, b.counts)
    for k in ("means", "quats", "scales", "opacities", "colors"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k


def test_compat_import_is_the_same_class():
    from recon3d.render import Gaussians as A
    from recon3d.render.gaussians import Gaussians as B
    from recon3d.render.gaussians.model import Gaussians as C

    assert A is B is C is Gaussians


def test_pack_and_split_round_trip_with_an_empty_object():
    dense, ragged = _dense(B=2, N=5), _packed([0, 3])
    packed = Gaussians.from_list([dense, ragged])
    assert packed.is_packed and packed.batch_size == 4
    assert packed.counts.tolist() == [5, 5, 0, 3] and packed.offsets.tolist() == [0, 5, 10, 10]
    assert packed.means.shape == (13, 3) and packed.counts.dtype == torch.int64
    # object i's rows are exactly the i-th input's rows, in order
    torch.testing.assert_close(packed[1].means, dense.means[1], rtol=0, atol=0)
    torch.testing.assert_close(packed[3].opacities, ragged.opacities, rtol=0, atol=0)
    empty = packed[2]
    assert empty.batch_size == 1 and empty.counts.tolist() == [0] and empty.means.shape == (0, 3)
    parts = packed.split()
    assert [p.counts.tolist() for p in parts] == [[5], [5], [0], [3]]
    _same(Gaussians.from_list(parts), packed)
    # a packed batch of equal sets converts back to the dense one it came from
    _same(packed[0:2].to_dense(), dense)
    _same(dense.packed().to_dense(), dense)


def test_dense_indexing_keeps_its_old_behaviour():
    g = _dense(B=3, N=4)
    one = g[1]
    assert not one.is_packed and one.means.shape == (1, 4, 3) and one.num_gaussians == 4
    torch.testing.assert_close(one.means[0], g.means[1], rtol=0, atol=0)
    assert g[-1].means.shape == (1, 4, 3) and g[0:2].batch_size == 2
    assert g.counts.tolist() == [4, 4, 4]
    with pytest.raises(IndexError, match="3 objects"):
        g[3]


def test_sh_sets_pack_and_mixed_colour_models_refuse():
    a, b = _dense(B=1, N=3, sh_degree=2), _dense(B=1, N=2, sh_degree=2, seed=4)
    p = Gaussians.from_list([a, b])
    assert p.colors.shape == (5, 9, 3) and p.sh_degree == 2
    _same(p[1].to_dense(), b)
    with pytest.raises(ShapeError, match=r"items\[1\]: sh_degree"):
        Gaussians.from_list([a, _dense(B=1, N=2)])


def test_to_keeps_counts_on_the_cpu():
    p = _packed([2, 0, 1]).to(torch.float64)
    assert p.means.dtype == torch.float64 and p.counts.dtype == torch.int64 and p.counts.device.type == "cpu"
    assert p.counts.tolist() == [2, 0, 1]


def test_construction_checks_name_the_argument():
    with pytest.raises(ShapeError, match="non-empty"):  # a dense batch of empty sets
        Gaussians(torch.zeros(1, 0, 3), torch.zeros(1, 0, 4), torch.zeros(1, 0, 3), torch.zeros(1, 0), torch.zeros(1, 0, 3))
    # ...while an all-empty packed batch is legal
    assert Gaussians(torch.zeros(0, 3), torch.zeros(0, 4), torch.zeros(0, 3), torch.zeros(0), torch.zeros(0, 3), counts=[0, 0]).batch_size == 2
    with pytest.raises(ShapeError, match="counts: expected per-object counts summing to the 3"):
        Gaussians(torch.zeros(3, 3), torch.ones(3, 4), torch.ones(3, 3), torch.ones(3), torch.ones(3, 3), counts=[1, 1])
    with pytest.raises(ShapeError, match="counts: a packed batch"):
        Gaussians(torch.zeros(3, 3), torch.ones(3, 4), torch.ones(3, 3), torch.ones(3), torch.ones(3, 3))
    with pytest.raises(ShapeError, match="counts: expected counts >= 0"):
        Gaussians(torch.zeros(0, 3), torch.ones(0, 4), torch.ones(0, 3), torch.ones(0), torch.ones(0, 3), counts=[1, -1])
    with pytest.raises(ShapeError, match="counts: expected a 1-D integer"):
        Gaussians(torch.zeros(2, 3), torch.ones(2, 4), torch.ones(2, 3), torch.ones(2), torch.ones(2, 3), counts=[1.0, 1.0])
    with pytest.raises(ShapeError, match="opacities"):
        Gaussians(torch.zeros(2, 3), torch.ones(2, 4), torch.ones(2, 3), torch.ones(2, 1), torch.ones(2, 3), counts=[2])
    with pytest.raises(ShapeError, match="quats"):
        Gaussians(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2), torch.zeros(1, 2, 3))
    with pytest.raises(ShapeError, match="a dense batch needs the same number"):
        _packed([2, 1]).to_dense()


def test_rasterizer_renders_a_ragged_batch_per_object():
    from recon3d.render import GaussianRasterizer, TorchGaussianRasterizer

    a, b = _dense(B=1, N=6, seed=2), _dense(B=1, N=3, seed=3)
    packed = Gaussians.from_list([a, _packed([0]), b])
    cams = orbit_cameras(torch.tensor([0.0, 90, 30, 200, 10, 45]), torch.tensor([10.0, 20, 0, -10, 5, 30]), 2.0, 45, 16, 12).reshape(3, 2)
    out = GaussianRasterizer(backend="torch", background="white")(packed, cams)
    ref = TorchGaussianRasterizer(background="white")
    for i, g in ((0, a), (2, b)):
        one = ref(g, cams[i : i + 1])
        for k in ("rgb", "alpha", "depth"):
            torch.testing.assert_close(out[k][i : i + 1], one[k], rtol=0, atol=0)
    # the empty object: white background, nothing covered
    assert torch.equal(out.rgb[1], torch.ones(2, 3, 12, 16)) and not out.alpha[1].any() and not out.depth[1].any()
    assert [m.shape[1] for m in out.extras["means2d"]] == [6, 0, 3]
