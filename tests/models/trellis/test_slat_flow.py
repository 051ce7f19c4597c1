"""recon3d's SLAT flow (sparse DiT) against upstream's key/shape manifest, plus behaviour checks.

The manifest entries were written by ``scripts/make_trellis_manifest.py`` from upstream's own
``SLatFlowModel`` (released args on meta, tiny presets for real); ``tiny_parity.safetensors``
holds upstream's randomised tiny weights, a two-object input and upstream's output (spconv 2.x on
the CPU, float64 attention), which recon3d's forward must reproduce.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from recon3d.models.trellis import TRELLIS_PRESETS, build_trellis_model, load_trellis_model
from recon3d.representations import SparseVoxels

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "trellis"
MANIFEST = json.loads((FIX / "official_manifest.json").read_text())
PRESETS = ("slat_flow_img_dit_L_64l8p2_fp16", "slat_flow_tiny", "slat_flow_tiny_p4")


def _layout(model):
    return {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("preset", PRESETS)
def test_state_dict_equals_upstream_manifest(preset):
    p = TRELLIS_PRESETS[preset]
    assert MANIFEST["configs"][preset]["args"] == p["args"]
    with torch.device("meta"):
        model = build_trellis_model(p["name"], p["args"], use_fp16=None)
    ref = {k: (v["shape"], v["dtype"]) for k, v in MANIFEST["configs"][preset]["keys"].items()}
    assert _layout(model) == ref


def test_paper_layout():
    ref = MANIFEST["configs"]["slat_flow_img_dit_L_64l8p2_fp16"]["keys"]
    assert ref["input_blocks.0.conv1.conv.weight"] == {"shape": [128, 3, 3, 3, 128], "dtype": "float16"}
    assert ref["out_blocks.0.conv1.conv.weight"]["shape"] == [128, 3, 3, 3, 2048]  # 1024 + 1024 skip
    assert ref["out_layer.weight"] == {"shape": [8, 128], "dtype": "float32"}


@pytest.mark.parametrize("conv_backend", ["torch", "auto"])
def test_forward_matches_upstream_tiny_output(conv_backend):
    """Upstream's tiny weights in recon3d reproduce upstream's recorded velocity (two objects of 37
    and 21 voxels, down to 8^3 and back, skip concatenation) on the input's voxels and row order."""
    name = "slat_flow_tiny"
    p = TRELLIS_PRESETS[name]
    fix = load_file(str(FIX / "tiny_parity.safetensors"))
    weights = {k.split("/weights/", 1)[1]: v.float() for k, v in fix.items() if k.startswith(f"{name}/weights/")}
    inputs = {k.split("/input/", 1)[1]: v for k, v in fix.items() if k.startswith(f"{name}/input/")}
    model = build_trellis_model(p["name"], {**p["args"], "conv_backend": conv_backend}).eval()
    model.load_state_dict(weights, strict=True)
    x = SparseVoxels(inputs["coords"], inputs["feats"], p["args"]["resolution"], 2)
    with torch.no_grad():
        out = model(x, inputs["t"], inputs["cond"])
    ref = fix[f"{name}/output"]
    assert torch.equal(out.coords, x.coords) and ref.abs().max() > 1.0
    # The recording is float32 (spconv, GEMMs) on another CPU: kernels' summation order differs by
    # machine (an AMD EPYC differs by up to 1.8e-5 on outputs of magnitude > 1); a wrong layer or
    # weight moves the velocity by orders more.
    torch.testing.assert_close(out.feats, ref, rtol=1e-4, atol=5e-5)


def test_downsample_counts_the_zero_as_upstream():
    """Upstream pools with scatter_reduce(mean, include_self=True) on zeros: sum / (n + 1)."""
    from recon3d.models.trellis.sparse_blocks import TrellisSparseDownsample

    c = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 1, 1], [0, 5, 5, 5], [1, 0, 0, 0]], dtype=torch.int32)
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0]])
    out = TrellisSparseDownsample(2)(SparseVoxels(c, f, 8, 2))
    ref = torch.zeros(3, 2).scatter_reduce(0, torch.tensor([0, 0, 0, 1, 2])[:, None].expand(-1, 2), f, reduce="mean")
    assert out.coords.tolist() == [[0, 0, 0, 0], [0, 2, 2, 2], [1, 0, 0, 0]] and out.resolution == 4
    torch.testing.assert_close(out.feats, ref)
    torch.testing.assert_close(out.feats, torch.tensor([[9 / 4, 12 / 4], [7 / 2, 8 / 2], [9 / 2, 10 / 2]]))


def _voxels(counts=(37, 11), res=16, ch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, n in enumerate(counts):
        cells = torch.randperm(res**3, generator=g)[:n].sort().values
        rows.append(torch.stack([torch.full((n,), b), cells // res**2, cells // res % res, cells % res], 1))
    c = torch.cat(rows).int()
    return SparseVoxels(c, torch.randn(c.shape[0], ch, generator=g), res, len(counts))


def _randomised(preset):
    p = TRELLIS_PRESETS[preset]
    m = build_trellis_model(p["name"], {**p["args"], "conv_backend": "torch"}).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, q in m.named_parameters():
            q.add_(torch.randn(q.shape, generator=g) * 0.1)
    return m


@pytest.mark.parametrize("preset", ["slat_flow_tiny", "slat_flow_tiny_p4"])
def test_forward_shapes_and_per_object_independence(preset):
    m = _randomised(preset)
    x = _voxels()
    t, cond = torch.tensor([300.0, 800.0]), torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = m(x, t, cond)
        assert torch.equal(y.coords, x.coords) and y.feats.shape == (48, 4) and y.feats.abs().max() > 0
        # object 1 alone (as batch index 0) gives the same velocity as inside the batch
        sl = slice(37, 48)
        c1 = x.coords[sl].clone()
        c1[:, 0] = 0
        alone = m(SparseVoxels(c1, x.feats[sl], 16, 1), t[1:], cond[1:])
        torch.testing.assert_close(alone.feats, y.feats[sl], rtol=1e-5, atol=1e-5)
        # changing object 0's condition leaves object 1 untouched
        cond2 = cond.clone()
        cond2[0] += 1
        y2 = m(x, t, cond2)
        torch.testing.assert_close(y2.feats[sl], y.feats[sl], rtol=0, atol=1e-6)
        assert (y2.feats[:37] - y.feats[:37]).abs().max() > 1e-4


def test_zero_init_velocity_and_strict_load(tmp_path):
    p = TRELLIS_PRESETS["slat_flow_tiny"]
    m = build_trellis_model(p["name"], p["args"])
    with torch.no_grad():
        v = m(_voxels(), torch.tensor([10.0, 900.0]), torch.randn(2, 5, 16))
    assert torch.equal(v.feats, torch.zeros_like(v.feats))
    # a json with use_fp16 (as released) + fp16 torso tensors loads strictly as float32
    args = {**p["args"], "use_fp16": True}
    with torch.device("meta"):
        half = _layout(build_trellis_model(p["name"], args, use_fp16=None))
    g = torch.Generator().manual_seed(2)
    state = {k: torch.randn(s, generator=g).to(getattr(torch, d)) for k, (s, d) in half.items()}
    assert any(t.dtype == torch.float16 for t in state.values())
    (tmp_path / "slat.json").write_text(json.dumps({"name": "SLatFlowModel", "args": args}))
    save_file(state, str(tmp_path / "slat.safetensors"))
    loaded = load_trellis_model(tmp_path / "slat.json")
    for k, t in loaded.state_dict().items():
        assert t.dtype == torch.float32 and torch.equal(t, state[k].float())
