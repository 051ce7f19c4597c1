"""TRELLIS's official checkpoint layout (dense models), checked against upstream's own classes.

``tests/fixtures/trellis/official_manifest.json`` and ``tiny_parity.safetensors`` were written by
``scripts/make_trellis_manifest.py`` from microsoft/TRELLIS's ``SparseStructureEncoder`` /
``SparseStructureDecoder`` / ``SparseStructureFlowModel`` (released args on meta, recon3d's tiny
presets for real), so these tests compare recon3d with upstream's code, not with a saver written
beside the loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from recon3d.errors import CheckpointError, ConfigError
from recon3d.models.trellis import TRELLIS_PRESETS, build_trellis_model, load_trellis_model

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "trellis"
MANIFEST = json.loads((FIX / "official_manifest.json").read_text())
PAPER = ("ss_enc_conv3d_16l8_fp16", "ss_dec_conv3d_16l8_fp16", "ss_flow_img_dit_L_16l8_fp16")
TINY = ("ss_enc_tiny", "ss_dec_tiny", "ss_flow_tiny", "ss_flow_tiny_shared_p2")


def _ref(preset: str) -> dict[str, tuple[list[int], str]]:
    return {k: (v["shape"], v["dtype"]) for k, v in MANIFEST["configs"][preset]["keys"].items()}


def _ours(model: torch.nn.Module) -> dict[str, tuple[list[int], str]]:
    return {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()}


def _write_ckpt(tmp_path: Path, preset: str, state: dict, args: dict | None = None, name: str | None = None) -> Path:
    p = TRELLIS_PRESETS[preset]
    js = tmp_path / f"{preset}.json"
    js.write_text(json.dumps({"name": name or p["name"], "args": args if args is not None else p["args"]}))
    save_file(state, str(tmp_path / f"{preset}.safetensors"))
    return js


def _random_state(preset: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dt = {"float16": torch.float16, "float32": torch.float32}
    return {k: torch.randn(shape, generator=g).to(dt[d]) for k, (shape, d) in _ref(preset).items()}


def test_manifest_comes_from_upstream():
    src = MANIFEST["source"]
    assert src["repo"] == "microsoft/TRELLIS" and len(src["commit"]) == 40
    # The generating script ran recon3d against upstream at tiny size and on the paper-size APE.
    diffs = {k: v for k, v in MANIFEST["checks"].items() if k.endswith("diff")}
    assert len(diffs) >= 8 and max(diffs.values()) < 1e-5
    assert MANIFEST["configs"]["ss_flow_img_dit_L_16l8_fp16"]["keys"]["pos_emb"]["shape"] == [4096, 1024]


@pytest.mark.parametrize("preset", PAPER + TINY)
def test_state_dict_equals_upstream_manifest(preset):
    p = TRELLIS_PRESETS[preset]
    assert MANIFEST["configs"][preset]["args"] == p["args"]
    with torch.device("meta"):  # the paper flow has 555M parameters: shapes and dtypes only
        model = build_trellis_model(p["name"], p["args"], use_fp16=None)  # the json's use_fp16, as upstream
    ours, ref = _ours(model), _ref(preset)
    assert sorted(set(ours) ^ set(ref)) == []
    assert ours == ref  # shapes and dtypes (paper: fp16 torso, fp32 norms / embedders / pos_emb)


def test_paper_sizes():
    flow = _ref("ss_flow_img_dit_L_16l8_fp16")
    n = sum(int(torch.Size(s).numel()) for k, (s, _) in flow.items() if k != "pos_emb")
    assert 5.4e8 < n < 5.7e8  # TRELLIS-image-large SS flow: ~555M parameters
    assert flow["blocks.23.self_attn.q_rms_norm.gamma"] == ([16, 64], "float32")
    assert flow["blocks.0.self_attn.to_qkv.weight"] == ([3072, 1024], "float16")
    enc, dec = _ref("ss_enc_conv3d_16l8_fp16"), _ref("ss_dec_conv3d_16l8_fp16")
    assert enc["out_layer.2.weight"][0] == [16, 512, 3, 3, 3]  # mean || logvar, 8 latent channels
    assert dec["blocks.2.conv.weight"][0] == [8 * 128, 512, 3, 3, 3]  # upsample: conv to 8 C + pixel shuffle
    assert dec["out_layer.2.weight"][0] == [1, 32, 3, 3, 3]


@pytest.mark.parametrize("preset", TINY)
def test_forward_matches_upstream_outputs(preset):
    """Upstream's tiny weights loaded into recon3d reproduce upstream's recorded outputs."""
    p = TRELLIS_PRESETS[preset]
    fix = load_file(str(FIX / "tiny_parity.safetensors"))
    weights = {k.split("/weights/", 1)[1]: v for k, v in fix.items() if k.startswith(f"{preset}/weights/")}
    inputs = {k.split("/input/", 1)[1]: v for k, v in fix.items() if k.startswith(f"{preset}/input/")}
    model = build_trellis_model(p["name"], p["args"]).eval()
    if "pos_emb" in weights:  # recon3d computes its own buffer: it must equal upstream's
        torch.testing.assert_close(model.pos_emb, weights["pos_emb"], rtol=0, atol=1e-6)
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    with torch.no_grad():
        if p["name"] == "SparseStructureEncoder":
            _, mean, logvar = model(inputs["x"], return_raw=True)
            out = torch.cat([mean, logvar], 1)
        elif p["name"] == "SparseStructureDecoder":
            out = model(inputs["z"])
        else:
            out = model(**inputs)
    torch.testing.assert_close(out, fix[f"{preset}/output"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", TINY)
def test_load_trellis_model_strict_fp16_file(tmp_path, preset):
    """A json saying use_fp16 (as every released one) + float16 torso tensors: loaded as float32."""
    p = TRELLIS_PRESETS[preset]
    args = {**p["args"], "use_fp16": True}
    with torch.device("meta"):
        half_layout = _ours(build_trellis_model(p["name"], args, use_fp16=None))
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(s, generator=g).to(getattr(torch, d)) for k, (s, d) in half_layout.items()}
    assert any(v.dtype == torch.float16 for v in state.values())
    model = load_trellis_model(_write_ckpt(tmp_path, preset, state, args=args))
    assert not model.training and model.dtype == torch.float32
    got = model.state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], v.float(), rtol=0, atol=0)
    kept = load_trellis_model(tmp_path / f"{preset}.json", use_fp16=None)  # the json's fp16 torso kept
    assert {str(v.dtype) for v in kept.state_dict().values()} == {str(v.dtype) for v in state.values()}


def test_unknown_and_unimplemented_class(tmp_path):
    js = _write_ckpt(tmp_path, "ss_flow_tiny", _random_state("ss_flow_tiny"), name="SparseStructureFlowModelV9")
    with pytest.raises(ConfigError, match=r"unknown TRELLIS model class 'SparseStructureFlowModelV9'") as e:
        load_trellis_model(js)
    assert "\n" not in str(e.value) and str(js) in str(e.value)
    js.write_text(json.dumps({"name": "SLatRadianceFieldDecoder", "args": {}}))
    with pytest.raises(ConfigError, match=r"'SLatRadianceFieldDecoder' is not implemented in recon3d yet"):
        load_trellis_model(js)
    js.write_text(json.dumps({"args": {}}))
    with pytest.raises(ConfigError, match=r"expected an object with 'name'"):
        load_trellis_model(js)
    js.write_text(json.dumps({"name": "SparseStructureFlowModel", "args": {**TRELLIS_PRESETS["ss_flow_tiny"]["args"], "depth": 3}}))
    with pytest.raises(ConfigError, match=r"bad 'args' for SparseStructureFlowModel.*depth"):
        load_trellis_model(js)
    with pytest.raises(ConfigError, match="not found"):
        load_trellis_model(tmp_path / "absent.json")


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_mismatched_checkpoint_is_one_line_and_never_partial(tmp_path, change):
    state = _random_state("ss_flow_tiny")
    if change == "missing":
        del state["blocks.1.cross_attn.to_kv.weight"]
        expect = r"1 missing \(e\.g\. \['blocks\.1\.cross_attn\.to_kv\.weight'\]\)"
    elif change == "unexpected":
        state["blocks.2.mlp.mlp.0.weight"] = torch.zeros(3)
        expect = r"1 unexpected \(e\.g\. \['blocks\.2\.mlp\.mlp\.0\.weight'\]\)"
    else:
        state["input_layer.weight"] = torch.zeros(32, 5)
        expect = r"1 with other shapes .*input_layer\.weight \(32, 5\) vs \(32, 4\)"
    js = _write_ckpt(tmp_path, "ss_flow_tiny", state)
    with pytest.raises(CheckpointError, match=expect) as e:
        load_trellis_model(js)
    assert "\n" not in str(e.value) and "ss_flow_tiny.safetensors" in str(e.value)
    # The strict check runs before any copy: a model given to the converter is left untouched.
    from recon3d.models.trellis import convert_trellis_state_dict

    model = build_trellis_model("SparseStructureFlowModel", TRELLIS_PRESETS["ss_flow_tiny"]["args"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError):
        convert_trellis_state_dict(state, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_weight_file(tmp_path):
    js = tmp_path / "ss_dec_tiny.json"
    js.write_text(json.dumps(TRELLIS_PRESETS["ss_dec_tiny"]))
    with pytest.raises(CheckpointError, match=r"ss_dec_tiny\.safetensors.*not found"):
        load_trellis_model(js)
