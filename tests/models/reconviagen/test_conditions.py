"""ReconViaGen's condition nets (GGC, paper PVC, official PVC).

``tests/fixtures/reconviagen/official_manifest.json`` and ``tiny_ggc_parity.safetensors`` were
written by ``scripts/make_reconviagen_manifest.py`` from upstream's own ``ModulatedMultiViewCond`` /
``ModulatedSLATMultiViewCond`` (GAP-LAB-CUHK-SZ/ReconViaGen); the other references here are plain
float64 torch written out op by op.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recon3d.errors import ConfigError, ShapeError
from recon3d.models.reconviagen.conditions import (
    ConditionFusionBlock,
    GlobalGeometryCondition,
    LinearPerViewCondition,
    PerViewCondition,
    condition_dropout,
    null_condition,
)

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "reconviagen"
MANIFEST = json.loads((FIX / "official_manifest.json").read_text())
LAYERS = (1, 2, 4, 5)  # tiny aggregator with 6 layers


def _keys(model: torch.nn.Module) -> dict:
    return {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()}


def _ref(name: str) -> dict:
    return {k: (v["shape"], v["dtype"]) for k, v in MANIFEST["configs"][name]["keys"].items()}


def _tokens(B=2, S=3, Np=4, Cv=12, n_layers=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, S, 5 + Np, Cv, generator=g) for _ in range(n_layers)]


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            centre = 1.0 if name.endswith("gamma") or name.endswith("norm2.weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + centre)


# ---------------------------------------------------------------- float64 reference, op by op
def _ln(x, w=None, b=None, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w + b


def _lin(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _rms(x, gamma):  # (B, L, H, D), gamma (H, D)
    return x / torch.sqrt((x**2).sum(-1, keepdim=True)) * math.sqrt(x.shape[-1]) * gamma


def _attend(q, k, v):  # (B, L, H, D), (B, S, H, D)
    s = torch.einsum("blhd,bshd->bhls", q, k) / math.sqrt(q.shape[-1])
    e = torch.exp(s - s.max(-1, keepdim=True).values)
    return torch.einsum("bhls,bshd->blhd", e / e.sum(-1, keepdim=True), v)


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _block_ref(x, ctx, sd, heads, rms_self=True, rms_cross=False):
    B, L, C = x.shape
    D = C // heads
    h = _ln(x)
    q, k, v = _lin(h, sd, "self_attn.to_qkv").reshape(B, L, 3, heads, D).unbind(2)
    if rms_self:
        q, k = _rms(q, sd["self_attn.q_rms_norm.gamma"]), _rms(k, sd["self_attn.k_rms_norm.gamma"])
    x = x + _lin(_attend(q, k, v).reshape(B, L, C), sd, "self_attn.to_out")
    h = _ln(x, sd["norm2.weight"], sd["norm2.bias"])
    q = _lin(h, sd, "cross_attn.to_q").reshape(B, L, heads, D)
    k, v = _lin(ctx, sd, "cross_attn.to_kv").reshape(B, ctx.shape[1], 2, heads, D).unbind(2)
    if rms_cross:
        q, k = _rms(q, sd["cross_attn.q_rms_norm.gamma"]), _rms(k, sd["cross_attn.k_rms_norm.gamma"])
    x = x + _lin(_attend(q, k, v).reshape(B, L, C), sd, "cross_attn.to_out")
    return x + _lin(_gelu_tanh(_lin(_ln(x), sd, "mlp.mlp.0")), sd, "mlp.mlp.2")


def _sd64(module, prefix=""):
    return {k[len(prefix):]: v.double() for k, v in module.state_dict().items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("rms_cross", [False, True])
def test_fusion_block_matches_float64_reference(rms_cross):
    blk = ConditionFusionBlock(16, 12, num_heads=4, mlp_ratio=4, qk_rms_norm=True, qk_rms_norm_cross=rms_cross)
    _randomise(blk)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 5, 16, generator=g), torch.randn(2, 7, 12, generator=g)
    ref = _block_ref(x.double(), ctx.double(), _sd64(blk), 4, rms_cross=rms_cross)
    out = blk(x, ctx)
    assert out.shape == (2, 5, 16)
    # norms compute in float32 by design (TRELLIS's LayerNorm32), so float32-level agreement
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_ggc_matches_reference_with_views_concatenated_along_tokens():
    B, S, Np, Cv, Cd = 2, 3, 4, 12, 6
    ggc = GlobalGeometryCondition(channels=16, vggt_channels=Cv, dino_channels=Cd, num_tokens=5, num_heads=2, layers=LAYERS)
    _randomise(ggc)
    toks = _tokens(B, S, Np, Cv)
    dino = torch.randn(B, S, 5 + Np, Cd, generator=torch.Generator().manual_seed(3))
    out = ggc(toks, dino)
    assert out.shape == (B, 5, 16)
    h = ggc.multiview_cond_tokens.double().expand(B, -1, -1)
    for k, layer in enumerate(LAYERS):
        # view-major: view 0's patches, then view 1's ...; special tokens (first 5) dropped from both
        ctx = torch.cat([torch.cat([toks[layer][:, s, 5:], dino[:, s, 5:]], -1) for s in range(S)], dim=1).double()
        h = _block_ref(h, ctx, _sd64(ggc, f"cond_blocks.{k}."), 2)
    torch.testing.assert_close(out.double(), h, atol=5e-5, rtol=5e-5)
    # no positional code in the context: the views' order does not matter, their content does
    perm = [2, 0, 1]
    torch.testing.assert_close(ggc([t[:, perm] for t in toks], dino[:, perm]), out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ggc([t[:, :1] for t in toks], dino[:, :1]), out, atol=1e-3)


def test_ggc_official_layout_matches_upstream_manifest():
    with torch.device("meta"):
        official = GlobalGeometryCondition(channels=1024, vggt_channels=2048, dino_channels=1024, num_tokens=4096, num_heads=16)
        pvc = LinearPerViewCondition(channels=1024, vggt_channels=2048)
    assert _keys(official) == _ref("ggc_official")
    assert _keys(pvc) == _ref("pvc_official")
    a = MANIFEST["configs"]["ggc_tiny"]["args"]
    tiny = GlobalGeometryCondition(channels=a["channels"], vggt_channels=2048, dino_channels=a["ctx_channels"] - 2048,
                                   num_tokens=a["num_init_tokens"], num_heads=a["num_heads"])
    assert _keys(tiny) == _ref("ggc_tiny")
    assert tuple(MANIFEST["layers"]) == tiny.layers == (4, 11, 17, 23)
    # upstream's forward against ours, as measured by the script (exact: same ops in the same order)
    assert MANIFEST["checks"]["ggc_tiny_forward_max_abs_diff"] < 1e-5 < MANIFEST["checks"]["ggc_tiny_output_abs_max"]
    assert MANIFEST["checks"]["pvc_official_forward_max_abs_diff"] < 1e-5 < MANIFEST["checks"]["pvc_official_output_abs_max"]


def test_ggc_reproduces_upstream_output_with_upstream_weights():
    t = load_file(str(FIX / "tiny_ggc_parity.safetensors"))
    a = MANIFEST["configs"]["ggc_tiny"]["args"]
    ggc = GlobalGeometryCondition(channels=a["channels"], vggt_channels=2048, dino_channels=1024,
                                  num_tokens=a["num_init_tokens"], num_heads=a["num_heads"]).eval()
    w = {k.split("/weights/")[1]: v.float() for k, v in t.items() if "/weights/" in k}
    ggc.load_state_dict(w, strict=True)
    ref = t["ggc_tiny/output"]
    layers = {int(k.rsplit("_", 1)[1]): v.float() for k, v in t.items() if "/input/vggt_" in k}
    shape = next(iter(layers.values())).shape
    agg = [layers.get(i, torch.zeros(shape)) for i in range(24)]
    with torch.no_grad():
        out = ggc(agg, t["ggc_tiny/input/dino"].float())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert ref.abs().max() > 1.0


def test_ggc_init_and_unconditional_branch():
    ggc = GlobalGeometryCondition(channels=8, vggt_channels=12, num_tokens=1024, num_heads=2, layers=LAYERS)
    std = ggc.multiview_cond_tokens.std().item()
    assert 0.95e-6 < std < 1.05e-6 and ggc.multiview_cond_tokens.shape == (1, 1024, 8)
    out = ggc(_tokens(Cv=12))
    neg = null_condition(out)
    assert neg.shape == out.shape and not neg.any() and out.abs().sum() > 0
    assert torch.equal(ggc.null(2), torch.zeros(2, 1024, 8))


def test_per_view_condition_is_per_view():
    pvc = PerViewCondition(channels=16, vggt_channels=12, num_tokens=6, num_heads=2, layers=LAYERS)
    _randomise(pvc)
    toks = _tokens(B=2, S=3, Cv=12)
    out = pvc(toks)
    assert out.shape == (2, 3, 6, 16)
    # view i's list depends on view i's features only: running that view alone gives the same list
    for i in range(3):
        torch.testing.assert_close(pvc([t[:, i:i + 1] for t in toks])[:, 0], out[:, i], atol=1e-5, rtol=1e-5)
    # and equals the reference block chain on that view's patch tokens
    h = pvc.view_cond_tokens.double().expand(2, -1, -1)
    for k, layer in enumerate(LAYERS):
        h = _block_ref(h, toks[layer][:, 1, 5:].double(), _sd64(pvc, f"cond_blocks.{k}."), 2)
    torch.testing.assert_close(out[:, 1].double(), h, atol=5e-5, rtol=5e-5)
    assert not torch.allclose(out[:, 0], out[:, 1], atol=1e-3)
    assert not pvc.null(2, 3).any() and pvc.null(2, 3).shape == out.shape


def test_linear_per_view_condition_matches_formula():
    B, S, P, Cv, C = 2, 3, 9, 12, 8
    pvc = LinearPerViewCondition(channels=C, vggt_channels=Cv, layers=LAYERS)
    toks = _tokens(B, S, 4, Cv)
    dino = torch.randn(B, S, P, C, generator=torch.Generator().manual_seed(5))
    out = pvc(toks, dino)
    assert out.shape == (B, S, P, C)
    c = dino.double()
    for k, layer in enumerate(LAYERS):
        sd = _sd64(pvc, f"linear_blocks.{k}.")
        c = torch.relu(torch.cat([toks[layer].double(), c], -1) @ sd["0.weight"].T + sd["0.bias"]) + dino.double()
    torch.testing.assert_close(out.double(), c, atol=1e-5, rtol=1e-5)
    # per view: view 2 alone gives the same tokens
    torch.testing.assert_close(pvc([t[:, 2:] for t in toks], dino[:, 2:])[:, 0], out[:, 2], atol=1e-6, rtol=1e-6)


def test_condition_dropout():
    cond = torch.randn(64, 3, 4) + 5
    assert torch.equal(condition_dropout(cond, 0.0), cond)
    assert not condition_dropout(cond, 1.0).any()
    g = torch.Generator().manual_seed(0)
    out = condition_dropout(cond, 0.5, generator=g)
    dropped = (out == 0).flatten(1).all(1)
    kept = (out == cond).flatten(1).all(1)
    assert torch.equal(dropped | kept, torch.ones(64, dtype=torch.bool)) and 10 < int(dropped.sum()) < 54
    for seed in range(6):  # one decision for the whole batch
        o = condition_dropout(cond, 0.5, per_batch=True, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(o, cond) or not o.any()
    with pytest.raises(ConfigError, match="p: expected"):
        condition_dropout(cond, 1.5)


def test_condition_nets_bad_input_messages():
    ggc = GlobalGeometryCondition(channels=8, vggt_channels=12, dino_channels=6, num_tokens=4, num_heads=2, layers=LAYERS)
    toks = _tokens(Cv=12)
    dino = torch.randn(2, 3, 9, 6)
    with pytest.raises(ShapeError, match="vggt_tokens: expected a list .* more than 5 entries .*got 4 entries"):
        ggc(toks[:4], dino)
    with pytest.raises(ShapeError, match=r"vggt_tokens\[\d\]: expected \[B, S, P, 12\]"):
        ggc([t[..., :10] for t in toks], dino)
    with pytest.raises(ShapeError, match="dino_tokens: required"):
        ggc(toks)
    with pytest.raises(ShapeError, match="dino_tokens: after dropping 5 leading tokens"):
        ggc(toks, dino[:, :, 1:])
    with pytest.raises(ShapeError, match="dino_channels=0"):
        GlobalGeometryCondition(channels=8, vggt_channels=12, num_tokens=4, num_heads=2, layers=LAYERS)(toks, dino)
    with pytest.raises(ConfigError, match="num_heads"):
        GlobalGeometryCondition(channels=8, vggt_channels=12, num_tokens=4, num_heads=3)
    with pytest.raises(ConfigError, match="layers"):
        PerViewCondition(channels=8, vggt_channels=12, num_tokens=4, num_heads=2, layers=())
    with pytest.raises(ShapeError, match="dino_tokens: expected \\[B, S, P, 8\\]"):
        LinearPerViewCondition(channels=8, vggt_channels=12, layers=LAYERS)(toks, torch.randn(2, 3, 8, 8))


def test_fp16_conversion_casts_linears_and_tokens():
    ggc = GlobalGeometryCondition(channels=8, vggt_channels=12, num_tokens=4, num_heads=2, layers=LAYERS, use_fp16=True)
    assert ggc.multiview_cond_tokens.dtype == torch.float16 and ggc.dtype == torch.float16
    assert ggc.cond_blocks[0].norm2.weight.dtype == torch.float32  # norms stay float32, as upstream
    ggc.convert_to_fp32()
    assert ggc.multiview_cond_tokens.dtype == torch.float32 and ggc(_tokens(Cv=12)).dtype == torch.float32
