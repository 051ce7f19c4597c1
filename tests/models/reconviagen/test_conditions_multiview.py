"""Per-view cross-attention (paper weighted fusion / official mean) and its installation into
TRELLIS's flows without editing them."""

from __future__ import annotations

import copy

import pytest
import torch

from recon3d.errors import ConfigError, ShapeError
from recon3d.models.reconviagen.multiview_cross_attention import (
    MultiViewCrossAttention,
    MultiViewDenseCrossAttention,
    MultiViewSparseCrossAttention,
    install_per_view_conditioning,
    pack_per_view_context,
    per_view_attentions,
)
from recon3d.models.sparse import SparseMultiHeadAttention
from recon3d.models.trellis import TRELLIS_PRESETS, build_trellis_model
from recon3d.models.trellis.modules import MultiHeadAttention
from recon3d.representations import SparseVoxels


def _voxels(counts=(23, 9), res=16, ch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, n in enumerate(counts):
        cells = torch.randperm(res**3, generator=g)[:n].sort().values
        rows.append(torch.stack([torch.full((n,), b), cells // res**2, cells // res % res, cells % res], 1))
    c = torch.cat(rows).int()
    return SparseVoxels(c, torch.randn(c.shape[0], ch, generator=g), res, len(counts))


def _randomise(module, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _flow(preset):
    p = TRELLIS_PRESETS[preset]
    m = build_trellis_model(p["name"], p["args"], use_fp16=None).eval()
    _randomise(m, scale=0.1)  # fresh flows are zero-initialised (velocity 0): make every branch count
    return m


def _dense_attn(seed=0):
    a = MultiHeadAttention(16, 2, ctx_channels=8, type="cross", qk_rms_norm=True)
    _randomise(a, seed)
    return a


def _sparse_attn(seed=0):
    a = SparseMultiHeadAttention(16, 2, ctx_channels=8, type="cross", backend="torch")
    _randomise(a, seed)
    return a


def _queries(kind):
    g = torch.Generator().manual_seed(4)
    return torch.randn(2, 6, 16, generator=g) if kind == "dense" else _voxels(ch=16, seed=4)


def _feats(out):
    return out.feats if isinstance(out, SparseVoxels) else out


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_mean_mode_identical_views_equal_single_view_cross_attention(kind):
    base = _dense_attn() if kind == "dense" else _sparse_attn()
    ref_attn = copy.deepcopy(base)
    mv = MultiViewCrossAttention.from_attention(base, mode="mean")
    assert isinstance(mv, MultiViewDenseCrossAttention if kind == "dense" else MultiViewSparseCrossAttention)
    x = _queries(kind)
    ctx = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    single = _feats(ref_attn(x, ctx))
    same = torch.stack([ctx] * 3, dim=1)  # (B, N=3, T, C)
    torch.testing.assert_close(_feats(mv(x, same)), single, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_feats(mv(x, ctx)), single)  # a 3-D context is one view
    # different views: the plain mean of the single-view results; a list allows different lengths
    views = [torch.randn(2, n, 8, generator=torch.Generator().manual_seed(n)) for n in (3, 5, 7)]
    want = sum(_feats(ref_attn(x, v)) for v in views) / 3
    torch.testing.assert_close(_feats(mv(x, views)), want, atol=1e-6, rtol=1e-6)
    assert not any(k.startswith("view_weight") for k in mv.state_dict())


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_weighted_mode_weights_in_unit_interval_and_train(kind):
    base = _dense_attn() if kind == "dense" else _sparse_attn()
    ref_attn = copy.deepcopy(base)
    mv = MultiViewCrossAttention.from_attention(base, mode="weighted", weight_hidden=8)
    x = _queries(kind)
    views = torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(2))
    # fresh: last layer zero, bias 0 -> every weight is sigmoid(0) = 1/2
    out, w = mv.combine(x, views, return_weights=True)
    assert len(w) == 3 and all(torch.equal(wi, torch.full_like(wi, 0.5)) for wi in w)
    _randomise(mv.view_weight, seed=3, scale=1.0)
    out, w = mv.combine(x, views, return_weights=True)
    n_tok = x.shape[1] if kind == "dense" else x.num_voxels
    for wi in w:
        assert wi.shape == ((2, n_tok, 1) if kind == "dense" else (n_tok, 1))
        assert (wi >= 0).all() and (wi <= 1).all() and wi.std() > 0.01
    # the sum of the weighted single-view results, weights recomputed by hand from each result
    want = 0
    for i in range(3):
        a = _feats(ref_attn(x, views[:, i]))
        h = mv.view_weight[1](a @ mv.view_weight[0].weight.T + mv.view_weight[0].bias)
        want = want + torch.sigmoid(h @ mv.view_weight[2].weight.T + mv.view_weight[2].bias) * a
    torch.testing.assert_close(_feats(out), want, atol=1e-5, rtol=1e-5)
    _feats(mv(x, views)).square().sum().backward()
    for p in mv.view_weight.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert mv.to_q.weight.grad.abs().sum() > 0


def test_weight_pool_object_gives_one_weight_per_view_and_object():
    mv = MultiViewCrossAttention.from_attention(_sparse_attn(), mode="weighted", weight_pool="object", weight_hidden=8)
    _randomise(mv.view_weight, seed=5, scale=1.0)
    x = _queries("sparse")
    _, w = mv.combine(x, torch.randn(2, 2, 5, 8), return_weights=True)
    b = x.coords[:, 0].long()
    for wi in w:
        assert torch.allclose(wi[b == 0], wi[b == 0][0]) and torch.allclose(wi[b == 1], wi[b == 1][0])
        assert not torch.allclose(wi[b == 0][0], wi[b == 1][0])
    dense = MultiViewCrossAttention.from_attention(_dense_attn(), mode="weighted", weight_pool="object")
    _randomise(dense.view_weight, seed=5, scale=1.0)
    _, w = dense.combine(_queries("dense"), torch.randn(2, 2, 5, 8), return_weights=True)
    assert torch.allclose(w[0], w[0][:, :1].expand_as(w[0]))


@pytest.mark.parametrize("preset,mode", [("slat_flow_tiny", "mean"), ("slat_flow_tiny", "weighted"),
                                         ("ss_flow_tiny", "mean"), ("ss_flow_tiny", "weighted")])
def test_install_keeps_keys_and_flow_runs_with_per_view_contexts(preset, mode):
    flow = _flow(preset)
    plain = copy.deepcopy(flow)
    before = flow.state_dict()
    params_before = {k: p for k, p in flow.named_parameters()}
    assert install_per_view_conditioning(flow, mode=mode) is flow
    after = flow.state_dict()
    added = set(after) - set(before)
    assert set(before) <= set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the very same parameter objects under the same names (optimisers, LoRA targets unchanged)
    assert all(dict(flow.named_parameters())[k] is p for k, p in params_before.items())
    n_blocks = len(flow.blocks)
    assert len(per_view_attentions(flow)) == n_blocks
    if mode == "mean":
        assert not added
    else:
        assert added == {f"blocks.{i}.cross_attn.view_weight.{j}.{w}" for i in range(n_blocks) for j in (0, 2) for w in ("weight", "bias")}
    # an official (plain) state dict loads, only the fusion MLP missing
    res = flow.load_state_dict(plain.state_dict(), strict=False)
    assert set(res.missing_keys) == added and not res.unexpected_keys

    C = TRELLIS_PRESETS[preset]["args"]["cond_channels"]
    g = torch.Generator().manual_seed(7)
    if preset.startswith("slat"):
        x = _voxels(ch=4)
    else:
        x = torch.randn(2, 4, 8, 8, 8, generator=g)
    t = torch.tensor([300.0, 800.0])
    ctx = torch.randn(2, 5, C, generator=g)
    views = torch.randn(2, 3, 5, C, generator=g)
    with torch.no_grad():
        out = _feats(flow(x, t, views))
        assert out.shape == _feats(plain(x, t, ctx)).shape and torch.isfinite(out).all()
        assert all(m.num_views == 3 for m in per_view_attentions(flow))
        # list input (the official layout) = the 4-D tensor; kwargs work as positional
        torch.testing.assert_close(_feats(flow(x, t, cond=list(views.unbind(1)))), out)
        if mode == "mean":
            # N identical views = the original flow with that one view
            same = torch.stack([ctx] * 3, dim=1)
            torch.testing.assert_close(_feats(flow(x, t, same)), _feats(plain(x, t, ctx)), atol=1e-5, rtol=1e-5)
            assert not torch.allclose(out, _feats(plain(x, t, ctx)), atol=1e-4)
        # a 3-D cond afterwards is one view again
        flow(x, t, ctx)
        assert all(m.num_views is None for m in per_view_attentions(flow))


def test_installed_weighted_flow_trains_the_fusion_mlp():
    flow = install_per_view_conditioning(_flow("slat_flow_tiny"), mode="weighted", weight_hidden=8)
    x = _voxels(ch=4)
    out = flow(x, torch.tensor([300.0, 800.0]), torch.randn(2, 2, 5, 16))
    out.feats.square().mean().backward()
    mlp = flow.blocks[0].cross_attn.view_weight
    assert mlp[2].weight.grad.abs().sum() > 0  # zero-init last layer: its weight gets the gradient first


class _NoCrossAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x, t, cond):
        return self.lin(x)


def test_pack_and_install_errors():
    with pytest.raises(ShapeError, match="per-view list must hold"):
        pack_per_view_context([torch.randn(2, 3, 4), torch.randn(2, 5, 4)])
    packed, n = pack_per_view_context(torch.randn(2, 3, 5, 4))
    assert packed.shape == (2, 15, 4) and n == 3
    flow = _flow("ss_flow_tiny")
    with pytest.raises(ConfigError, match="mode: expected one of"):
        install_per_view_conditioning(flow, mode="max")
    install_per_view_conditioning(flow, mode="mean")
    with pytest.raises(ConfigError, match="already installed"):
        install_per_view_conditioning(flow)
    with pytest.raises(ConfigError, match="no 'cross_attn' attention"):
        install_per_view_conditioning(_NoCrossAttention())
    with pytest.raises(ConfigError, match="argument named 'cond'"):
        install_per_view_conditioning(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="expected a cross-attention"):
        MultiViewCrossAttention.from_attention(MultiHeadAttention(8, 2, type="self"))
    mv = MultiViewCrossAttention.from_attention(_dense_attn(), mode="mean")
    mv.num_views = 4
    with pytest.raises(ShapeError, match="do not split into num_views=4"):
        mv(torch.randn(2, 6, 16), torch.randn(2, 6, 8))


@pytest.mark.slow
def test_lora_on_an_installed_flow_reaches_the_per_view_attention():
    from recon3d.adapters import add_lora, merge_lora

    flow = install_per_view_conditioning(_flow("slat_flow_tiny"), mode="mean")
    x, t, views = _voxels(ch=4), torch.tensor([300.0, 800.0]), torch.randn(2, 2, 5, 16)
    with torch.no_grad():
        base = flow(x, t, views).feats
    add_lora(flow, target_modules=r"blocks\.\d+\.cross_attn\.to_(q|kv|out)", r=4, alpha=8)
    for name, p in flow.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        adapted = flow(x, t, views).feats
    assert not torch.allclose(adapted, base, atol=1e-4)  # the wrapper calls the LoRA layers
    merge_lora(flow)
    with torch.no_grad():
        torch.testing.assert_close(flow(x, t, views).feats, adapted, atol=1e-5, rtol=1e-5)


def test_vggt_to_condition_nets_to_flows_end_to_end():
    """The wiring: VGGT aggregator tokens -> GGC -> SS flow, and -> per-view condition -> installed
    SLAT flow; gradients reach the condition nets' token lists (they train with the flows)."""
    from recon3d.models.reconviagen.conditions import GlobalGeometryCondition, PerViewCondition
    from recon3d.models.vggt.network import VGGTNetwork

    vggt = VGGTNetwork("tiny", heads=()).eval()
    with torch.no_grad():
        out = vggt(torch.rand(2, 3, 3, 28, 28, generator=torch.Generator().manual_seed(0)))
    toks, ps = out["tokens"], out["patch_start_idx"]
    Cv = toks[0].shape[-1]
    assert ps == 5 and len(toks) == 4 and toks[0].shape == (2, 3, 5 + 4, Cv)
    layers = (0, 1, 2, 3)
    ggc = GlobalGeometryCondition(channels=16, vggt_channels=Cv, num_tokens=8, num_heads=2, layers=layers)
    ss = _flow("ss_flow_tiny")
    v = ss(torch.randn(2, 4, 8, 8, 8), torch.tensor([100.0, 900.0]), ggc(toks, patch_start_idx=ps))
    v.square().mean().backward()
    assert ggc.multiview_cond_tokens.grad.abs().sum() > 0 and ggc.cond_blocks[0].cross_attn.to_kv.weight.grad.abs().sum() > 0

    pvc = PerViewCondition(channels=16, vggt_channels=Cv, num_tokens=6, num_heads=2, layers=layers)
    slat = install_per_view_conditioning(_flow("slat_flow_tiny"), mode="weighted")
    cond = pvc(toks, patch_start_idx=ps)
    assert cond.shape == (2, 3, 6, 16)
    slat(_voxels(ch=4), torch.tensor([100.0, 900.0]), cond).feats.square().mean().backward()
    assert pvc.view_cond_tokens.grad.abs().sum() > 0


def test_installed_flow_survives_deepcopy_and_pickle(tmp_path):
    flow = install_per_view_conditioning(_flow("slat_flow_tiny"), mode="weighted", weight_hidden=4)
    _randomise(flow.blocks[1].cross_attn.view_weight, seed=9, scale=1.0)
    x, t, views = _voxels(ch=4), torch.tensor([300.0, 800.0]), torch.randn(2, 3, 5, 16)
    with torch.no_grad():
        ref = flow(x, t, views).feats
        twin = copy.deepcopy(flow)
        torch.testing.assert_close(twin(x, t, views).feats, ref)
        # the copy's attentions use the copy's parameters, not the original's
        assert twin.blocks[0].cross_attn.to_q.weight is not flow.blocks[0].cross_attn.to_q.weight
        torch.save(flow, tmp_path / "flow.pt")
        again = torch.load(tmp_path / "flow.pt", weights_only=False)
        torch.testing.assert_close(again(x, t, views).feats, ref)


def test_fusion_mlp_follows_the_half_precision_flow():
    p = TRELLIS_PRESETS["ss_flow_tiny"]
    flow = build_trellis_model(p["name"], {**p["args"], "use_fp16": True}, use_fp16=None)
    install_per_view_conditioning(flow, mode="weighted")
    assert flow.blocks[0].cross_attn.view_weight[0].weight.dtype == torch.float16 == flow.blocks[0].cross_attn.to_q.weight.dtype
    with torch.no_grad():
        v = flow(torch.randn(1, 4, 8, 8, 8), torch.tensor([500.0]), torch.randn(1, 2, 5, 16))
    assert v.dtype == torch.float32 and torch.isfinite(v).all()


@pytest.mark.slow  # the first checkpointed call loads torch's checkpoint machinery (seconds)
def test_gradient_checkpointing_recomputes_with_the_same_views():
    flow = install_per_view_conditioning(_flow("slat_flow_tiny"), mode="weighted")
    ckpt = copy.deepcopy(flow)
    for b in ckpt.blocks:
        b.use_checkpoint = True
    x, t, views = _voxels(ch=4), torch.tensor([300.0, 800.0]), torch.randn(2, 3, 5, 16)
    flow(x, t, views).feats.square().sum().backward()
    ckpt(x, t, views).feats.square().sum().backward()
    for (name, p), q in zip(flow.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
