"""RectifiedFlowObjective: formulas against their closed forms, t schedules, dropout, seeds, layouts."""

from __future__ import annotations

import math

import pytest
import torch

from recon3d.errors import ConfigError, ShapeError
from recon3d.models.flow import FlowEulerSampler, RectifiedFlowObjective, layout_of
from recon3d.representations.voxels import SparseVoxels


def _voxels(counts, channels=4, res=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = torch.cat([torch.full((n,), i) for i, n in enumerate(counts)]).long()
    xyz = torch.randint(0, res, (len(b), 3), generator=g)
    return SparseVoxels(torch.cat([b[:, None], xyz], 1), torch.randn(len(b), channels, generator=g), res, len(counts))


def test_diffuse_target_and_x0_match_the_trellis_formulas_in_float64():
    sig = 0.05
    obj = RectifiedFlowObjective(sigma_min=sig)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 5, generator=g, dtype=torch.float64), torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    x_t = obj.diffuse(x0, t, eps)
    for i, ti in enumerate(t.tolist()):  # per object, written out scalar by scalar
        assert torch.allclose(x_t[i], (1 - ti) * x0[i] + (sig + (1 - sig) * ti) * eps[i], atol=1e-12)
    assert torch.allclose(x_t[2], eps[2], atol=1e-12)  # t = 1 is pure noise
    v = obj.target(x0, eps)
    assert torch.allclose(v, (1 - sig) * eps - x0, atol=1e-12)
    # v is d x_t / d t (central difference of the path) and x0_from_velocity inverts it exactly.
    h = 1e-6
    dxdt = (obj.diffuse(x0, t.clamp(h, 1 - h) + h, eps) - obj.diffuse(x0, t.clamp(h, 1 - h) - h, eps)) / (2 * h)
    assert torch.allclose(dxdt, v, atol=1e-6)
    assert torch.allclose(obj.x0_from_velocity(x_t, t, v), x0, atol=1e-12)
    assert torch.allclose(obj.velocity_from_x0(x_t, t, x0), v, atol=1e-9)


def test_reconviagen_target_differs_from_trellis_by_order_sigma_over_t():
    sig = 1e-3
    a, b = RectifiedFlowObjective(sigma_min=sig), RectifiedFlowObjective(sigma_min=sig, target="reconviagen")
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 16, generator=g, dtype=torch.float64), torch.randn(4, 16, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=torch.float64)
    x_t = a.diffuse(x0, t, eps)
    vr = b.target(x0, eps, t=t, x_t=x_t)
    s = sig + (1 - sig) * t[:, None]
    assert torch.allclose(vr, (x_t - (1 - sig) * x0) / s, atol=1e-12)
    diff = (vr - a.target(x0, eps)).abs().amax(1)
    assert torch.all(diff < 10 * sig / t) and torch.all(diff > 0)
    with pytest.raises(ConfigError, match="needs t"):
        b.target(x0, eps)


def test_logit_normal_t_has_logit_mean_and_std_one_and_uniform_is_uniform():
    g = torch.Generator().manual_seed(0)
    t = RectifiedFlowObjective().sample_t(40_000, g)
    assert t.dtype == torch.float32 and torch.all((t > 0) & (t < 1))
    t = t.double()
    logit = torch.log(t) - torch.log1p(-t)
    assert abs(float(logit.mean()) - 1.0) < 0.03 and abs(float(logit.std()) - 1.0) < 0.03
    t2 = RectifiedFlowObjective(t_mean=-0.5, t_std=2.0).sample_t(40_000, g).double()
    logit2 = torch.log(t2) - torch.log1p(-t2)
    assert abs(float(logit2.mean()) + 0.5) < 0.05 and abs(float(logit2.std()) - 2.0) < 0.05
    u = RectifiedFlowObjective(t_schedule="uniform").sample_t(40_000, g).double()
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.003
    one = RectifiedFlowObjective.reconviagen().sample_t(16, g)
    assert torch.all(one == one[0])  # ReconViaGen: one t for the whole batch


def test_condition_dropout_per_object_zeroes_rows_at_rate_p():
    obj = RectifiedFlowObjective(p_uncond=0.1)
    B = 20_000
    x0 = torch.randn(B, 2)
    cond = {"img": torch.randn(B, 3, 4) + 5, "extra": [torch.ones(B, 2)], "name": "kept"}
    b = obj.prepare(x0, cond, generator=torch.Generator().manual_seed(3))
    rate = float(b.dropped.double().mean())
    assert abs(rate - 0.1) < 4 * math.sqrt(0.1 * 0.9 / B)
    d = b.dropped
    assert torch.all(b.cond["img"][d] == 0) and torch.all(b.cond["extra"][0][d] == 0)
    assert torch.equal(b.cond["img"][~d], cond["img"][~d]) and b.cond["name"] == "kept"
    # An explicit neg_cond replaces instead of zeros.
    neg = {"img": torch.full((1, 3, 4), -1.0).expand(B, 3, 4), "extra": [torch.zeros(B, 2)], "name": "x"}
    b2 = obj.prepare(x0, cond, neg, generator=torch.Generator().manual_seed(3))
    assert torch.equal(b2.dropped, d) and torch.all(b2.cond["img"][d] == -1)


def test_condition_dropout_per_batch_is_all_or_nothing_at_rate_p():
    obj = RectifiedFlowObjective(p_uncond=0.25, dropout="batch")
    g = torch.Generator().manual_seed(4)
    masks = torch.stack([obj.drop_mask(6, g) for _ in range(4000)])
    assert torch.all(masks.all(1) | ~masks.any(1))
    assert abs(float(masks[:, 0].double().mean()) - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 4000)
    b = obj.prepare(torch.randn(6, 3), torch.randn(6, 5) + 1, generator=torch.Generator().manual_seed(0))
    assert b.cond.abs().sum(1).eq(0).all() == b.dropped.all()
    assert not RectifiedFlowObjective(p_uncond=0.0).drop_mask(100, g).any()


def test_per_object_generators_make_an_object_independent_of_its_batch():
    obj = RectifiedFlowObjective()
    x0 = torch.randn(3, 4, 6)
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(3)]  # noqa: E731
    full = obj.prepare(x0, torch.randn(3, 2), generator=gens())
    alone = obj.prepare(x0[1:2], torch.randn(1, 2), generator=[gens()[1]])
    assert torch.equal(full.t[1:2], alone.t) and torch.equal(full.noise[1:2], alone.noise)
    assert torch.equal(full.x_t[1:2], alone.x_t) and torch.equal(full.dropped[1:2], alone.dropped)
    # Sparse: object 1's noise does not depend on object 0's size.
    a, b = _voxels([5, 7]), _voxels([2, 7])
    b = SparseVoxels(b.coords.clone(), torch.cat([b.feats[:2], a.feats[5:]]), 8, 2)
    na = FlowEulerSampler().noise_like(a, [torch.Generator().manual_seed(i) for i in range(2)])
    nb = FlowEulerSampler().noise_like(b, [torch.Generator().manual_seed(i) for i in range(2)])
    assert torch.equal(na.feats[5:], nb.feats[2:])


def test_sparse_and_packed_states_broadcast_t_per_object():
    sig = 0.01
    obj = RectifiedFlowObjective(sigma_min=sig)
    sv = _voxels([3, 0, 5], channels=2)
    t = torch.tensor([0.2, 0.5, 0.9])
    eps = sv.replace(feats=torch.randn_like(sv.feats))
    x_t = obj.diffuse(sv, t, eps)
    assert isinstance(x_t, SparseVoxels) and torch.equal(x_t.coords, sv.coords)
    for i in range(3):  # per-object dense reference
        xi, ei = sv[i].feats, eps[i].feats
        assert torch.allclose(x_t[i].feats, (1 - t[i]) * xi + (sig + (1 - sig) * t[i]) * ei, atol=1e-6)
    packed = obj.diffuse(sv.feats, t, eps.feats, batch_index=sv.coords[:, 0])
    assert torch.equal(packed, x_t.feats)
    v = obj.target(sv, eps)
    assert torch.allclose(obj.x0_from_velocity(x_t, t, v).feats, sv.feats, atol=1e-6)
    # Loss and per-object MSE (the empty object is NaN) with a model that is off by 1 on object 2.
    def model(x, tt, cond):
        assert isinstance(x, SparseVoxels) and tt.shape == (3,)
        tgt = obj_batch.target.feats + (x.coords[:, :1] == 2).float()
        return x.replace(feats=tgt)
    obj_batch = obj.prepare(sv, generator=torch.Generator().manual_seed(0))
    out = RectifiedFlowObjective(sigma_min=sig).loss(model, sv, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.per_object[[0, 2]], torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-6)
    assert math.isnan(float(out.per_object[1]))
    assert abs(float(out.loss) - 5 / 8) < 1e-6


def test_layout_std_matches_per_object_torch_std():
    sv = _voxels([4, 1, 9], channels=3)
    lay = layout_of(sv)
    sd = lay.std(sv.feats)
    assert torch.allclose(sd[[0, 2]], torch.stack([sv[0].feats.std(), sv[2].feats.std()]), atol=1e-6)
    assert torch.allclose(sd[1], sv[1].feats.std(), atol=1e-6)  # 3 elements: still defined
    dense = torch.randn(2, 3, 4)
    assert torch.allclose(layout_of(dense).std(dense), dense.flatten(1).std(1))
    # An unsorted packed index takes the scatter path: same numbers as the per-object slices.
    perm = torch.randperm(sv.num_voxels, generator=torch.Generator().manual_seed(0))
    shuffled = layout_of(sv.feats[perm], batch_index=sv.coords[perm, 0])
    assert shuffled._slices is None
    assert torch.allclose(shuffled.std(sv.feats[perm]), sd, atol=1e-6)
    assert torch.allclose(shuffled.mean(sv.feats[perm]), lay.mean(sv.feats), atol=1e-9)


@pytest.mark.parametrize("kwargs, match", [
    ({"sigma_min": 1.0}, "sigma_min"), ({"sigma_min": -0.1}, "sigma_min"), ({"t_schedule": "cosine"}, "t_schedule"),
    ({"t_std": 0.0}, "t_std"), ({"p_uncond": 1.5}, "p_uncond"), ({"dropout": "view"}, "dropout"),
    ({"target": "eps"}, "target"), ({"t_per": "step"}, "t_per"), ({"time_scale": 0}, "time_scale"),
])
def test_bad_objective_options_raise_one_line(kwargs, match):
    with pytest.raises(ConfigError, match=match) as e:
        RectifiedFlowObjective(**kwargs)
    assert "\n" not in str(e.value)


def test_bad_inputs_raise_one_line():
    obj = RectifiedFlowObjective()
    with pytest.raises(ShapeError, match="cond: expected the leading batch size 4"):
        obj.prepare(torch.randn(4, 2), torch.randn(3, 2))
    with pytest.raises(ShapeError, match="generator"):
        obj.prepare(torch.randn(4, 2), generator=[torch.Generator()] * 3)
    with pytest.raises(ShapeError, match="batch_index"):
        obj.diffuse(torch.randn(4, 2), 0.5, torch.randn(4, 2), batch_index=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ShapeError, match="noise"):
        obj.diffuse(torch.randn(4, 2), 0.5, torch.randn(4, 3))
    with pytest.raises(ShapeError, match="per-object value"):
        obj.diffuse(torch.randn(4, 2), torch.rand(3), torch.randn(4, 2))
