"""Era3DUNet against upstream's layout and numbers (manifest + forward reference from
scripts/make_era3d_manifest.py, built from pengHTYX/Era3D's own classes), its strict loader, and
its two attentions against float64 loop references."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from recon3d.errors import CheckpointError, ConfigError, ShapeError
from recon3d.models.era3d.pretrained import convert_official_state_dict, load_era3d_unet, official_key_table
from recon3d.models.era3d.unet import ERA3D_PRESETS, Era3DUNet, Era3DUNetConfig, joint_domain_attention, rowwise_attention

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "era3d"
MANIFEST = json.loads((FIXTURES / "official_manifest.json").read_text())


def _manifest_shapes(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v["shape"]) for k, v in MANIFEST["configs"][name]["keys"].items()}


def _reference_weights(net: Era3DUNet) -> dict[str, torch.Tensor]:
    # the manifest script's rule (its _deterministic_weights), applied to recon3d's own key list
    out = {}
    for i, (key, t) in enumerate(sorted(net.state_dict().items())):
        g = torch.Generator().manual_seed(i)
        std = 0.2 if t.ndim < 2 else float(torch.tensor(t.shape[1:]).prod()) ** -0.5
        out[key] = std * torch.randn(t.shape, generator=g)
    return out


@pytest.mark.parametrize("name", ["tiny", "paper", "paper_ortho"])
def test_config_from_upstream_options_is_the_preset(name):
    # upstream's constructor arguments (as the released unet/config.json holds them) map onto the preset
    assert Era3DUNetConfig.from_diffusers_config(MANIFEST["configs"][name]["options"]) == ERA3D_PRESETS[name]


@pytest.mark.parametrize("name", ["tiny", "paper", "paper_ortho"])
def test_key_table_matches_the_upstream_manifest(name):
    assert set(official_key_table(ERA3D_PRESETS[name])) == set(_manifest_shapes(name))


@pytest.mark.parametrize("name", ["tiny", pytest.param("paper", marks=pytest.mark.slow), pytest.param("paper_ortho", marks=pytest.mark.slow)])
def test_network_shapes_match_the_upstream_manifest(name):
    want = _manifest_shapes(name)
    cfg = ERA3D_PRESETS[name]
    table = official_key_table(cfg)
    with torch.device("meta"):  # paper size: ~1e9 parameters, no memory on meta (about 15 s to build)
        net = Era3DUNet(cfg)
    got = {table_key: tuple(net.state_dict()[ours].shape) for table_key, ours in table.items()}
    assert got == want
    assert sum(math.prod(s) for s in want.values()) == MANIFEST["configs"][name]["num_parameters"]


def test_forward_equals_upstream_reference():
    net = Era3DUNet("tiny").eval()
    net.load_state_dict(_reference_weights(net), strict=True)
    ref = load_file(str(FIXTURES / "tiny_forward.safetensors"))
    with torch.no_grad():
        eps, pose = net(ref["input.sample"], ref["input.timestep"], ref["input.encoder_hidden_states"], ref["input.class_labels"])
    assert eps.shape == ref["output.sample"].shape == (24, 4, 8, 8)
    torch.testing.assert_close(eps, ref["output.sample"], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(pose, ref["output.pose_pred"], atol=2e-5, rtol=1e-4)
    # the reference is not trivially matched: another weight set gives another output
    net.load_state_dict({k: v * 1.01 for k, v in _reference_weights(net).items()})
    with torch.no_grad():
        other, _ = net(ref["input.sample"], ref["input.timestep"], ref["input.encoder_hidden_states"], ref["input.class_labels"])
    assert (other - ref["output.sample"]).abs().max() > 1e-3


def _write_unet_folder(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "tiny") -> Path:
    folder = tmp_path / "unet"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNetMV2DConditionModel", **MANIFEST["configs"][name]["options"]}))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_synthetic_official_file_loads_strictly(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g).to(dtype) for k, s in _manifest_shapes("tiny").items()}
    net = load_era3d_unet(_write_unet_folder(tmp_path, state).parent)  # the model folder holding unet/
    assert net.config == ERA3D_PRESETS["tiny"]
    loaded = net.state_dict()
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert loaded[k].dtype == torch.float32
        assert torch.equal(loaded[k], v.float()), k


def test_missing_extra_and_reshaped_keys_are_one_line(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) for k, s in _manifest_shapes("tiny").items()}
    net = Era3DUNet("tiny")
    missing = dict(state)
    missing.pop("mid_block.attentions.0.transformer_blocks.0.attn_mv.to_q.weight")
    with pytest.raises(CheckpointError) as e:
        convert_official_state_dict(missing, net, source="w.safetensors")
    assert "\n" not in str(e.value) and "1 missing" in str(e.value) and "attn_mv.to_q" in str(e.value)
    extra = dict(state, **{"up_blocks.1.attentions.0.transformer_blocks.0.attn_joint.to_q.weight": torch.zeros(64, 64)})
    with pytest.raises(CheckpointError) as e:
        convert_official_state_dict(extra, net, source="w.safetensors")
    assert "\n" not in str(e.value) and "1 unexpected" in str(e.value) and "attn_joint" in str(e.value)
    reshaped = dict(state, **{"conv_in.weight": torch.zeros(32, 4, 3, 3)})  # the 4-channel SD-2.1 conv_in
    with pytest.raises(CheckpointError, match=r"conv_in.weight \(32, 4, 3, 3\) vs \(32, 8, 3, 3\)"):
        convert_official_state_dict(reshaped, net, source="w.safetensors")
    # the ortho release's file into the regressing network: the regressors are missing
    ortho_net = Era3DUNet(Era3DUNetConfig(**{**ERA3D_PRESETS["tiny"].to_dict(), "regress_elevation": False, "regress_focal_length": False}))
    with pytest.raises(CheckpointError, match="unexpected"):
        convert_official_state_dict(state, ortho_net)


def test_missing_files_and_unsupported_config_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"config.json: not found: download"):
        load_era3d_unet(tmp_path)
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MANIFEST["configs"]["tiny"]["options"]))
    with pytest.raises(CheckpointError, match="no weight file"):
        load_era3d_unet(folder)
    (folder / "config.json").write_text(json.dumps({**MANIFEST["configs"]["tiny"]["options"], "cd_attention_mid": True}))
    with pytest.raises(CheckpointError, match="cd_attention_mid=True is not supported"):
        load_era3d_unet(folder)


# ---------------------------------------------------------------------------- attention references
def _attention_module(dim=8, heads=2):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(dim, heads=heads, dim_head=dim // heads)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return attn.double()


def _softmax_attention64(attn, q_tokens, kv_tokens):
    """Per-head softmax attention on (L, C) float64 tokens, written without reshapes tricks."""
    q, k, v = attn.to_q(q_tokens), attn.to_k(kv_tokens), attn.to_v(kv_tokens)
    d = q.shape[-1] // attn.heads
    heads = []
    for h in range(attn.heads):
        sl = slice(h * d, (h + 1) * d)
        w = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(d), dim=-1)
        heads.append(w @ v[:, sl])
    return attn.to_out[0](torch.cat(heads, dim=-1))


def test_rowwise_attention_equals_float64_reference():
    attn = _attention_module()
    b, v, hh, ww, c = 2, 3, 4, 5, 8
    x = torch.randn(b * v, hh * ww, c, dtype=torch.float64)
    got = rowwise_attention(attn, x, num_views=v, height=hh)
    grid = x.reshape(b, v, hh, ww, c)
    want = torch.empty_like(grid)
    for i in range(b):
        for r in range(hh):
            tokens = grid[i, :, r].reshape(v * ww, c)  # row r of every view of object i
            want[i, :, r] = _softmax_attention64(attn, tokens, tokens).reshape(v, ww, c)
    torch.testing.assert_close(got, want.reshape(b * v, hh * ww, c), atol=1e-12, rtol=1e-12)
    # rows do not mix: changing row 0 of one view leaves every other row of the output alone
    x2 = x.clone()
    x2.view(b, v, hh, ww, c)[0, 1, 0] += 1.0
    diff = (rowwise_attention(attn, x2, v, hh) - got).abs().reshape(b, v, hh, ww, c).amax(dim=(3, 4))
    assert diff[0, :, 0].min() > 0 and diff[:, :, 1:].max() == 0 and diff[1].max() == 0


def test_joint_domain_attention_equals_float64_reference():
    attn = _attention_module()
    m, length, c = 3, 6, 8
    x = torch.randn(2 * m, length, c, dtype=torch.float64)
    got = joint_domain_attention(attn, x)
    for i in range(m):
        tokens = torch.cat([x[i], x[m + i]], dim=0)  # normal view i and its colour view
        out = _softmax_attention64(attn, tokens, tokens)
        torch.testing.assert_close(got[i], out[:length], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(got[m + i], out[length:], atol=1e-12, rtol=1e-12)
    with pytest.raises(ShapeError, match="even batch"):
        joint_domain_attention(attn, x[:5])


def test_bad_inputs_are_one_line():
    net = Era3DUNet("tiny")
    x, ctx, cls = torch.zeros(12, 8, 8, 8), torch.zeros(12, 3, 16), torch.zeros(12, 32)
    with pytest.raises(ShapeError, match="multiple of 12"):
        net(x[:6], 10, ctx[:6], cls[:6])
    with pytest.raises(ShapeError, match="class_labels: expected \\(12, 32\\)"):
        net(x, 10, ctx, cls[:, :16])
    with pytest.raises(ShapeError, match="encoder_hidden_states"):
        net(x, 10, ctx[..., :8], cls)
    with pytest.raises(ConfigError, match="one of"):
        Era3DUNet("huge")
    with pytest.raises(ConfigError, match="camera_embed_input_dim"):
        Era3DUNetConfig(regress_focal_length=False)
