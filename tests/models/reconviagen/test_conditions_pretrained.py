"""Loading official ReconViaGen condition-net weights (pipeline json + safetensors, or a training
Lightning checkpoint with its ``ss_cond.`` / ``slat_cond.`` prefix), with upstream's own tiny
weights and output from ``tests/fixtures/reconviagen/tiny_ggc_parity.safetensors``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from recon3d.errors import CheckpointError, ConfigError
from recon3d.models.reconviagen.condition_pretrained import build_condition_net, load_condition_net
from recon3d.models.reconviagen.conditions import GlobalGeometryCondition, LinearPerViewCondition

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "reconviagen"
MANIFEST = json.loads((FIX / "official_manifest.json").read_text())
TINY = MANIFEST["configs"]["ggc_tiny"]


def _fixture():
    t = load_file(str(FIX / "tiny_ggc_parity.safetensors"))
    weights = {k.split("/weights/")[1]: v for k, v in t.items() if "/weights/" in k}  # float16, as released files
    layers = {int(k.rsplit("_", 1)[1]): v.float() for k, v in t.items() if "/input/vggt_" in k}
    shape = next(iter(layers.values())).shape
    agg = [layers.get(i, torch.zeros(shape)) for i in range(24)]
    return weights, agg, t["ggc_tiny/input/dino"].float(), t["ggc_tiny/output"]


def test_pipeline_json_and_safetensors_reproduce_upstream(tmp_path):
    weights, agg, dino, ref = _fixture()
    js = tmp_path / "sparse_structure_vggt_cond.json"
    js.write_text(json.dumps({"name": TINY["name"], "args": {**TINY["args"], "use_fp16": True}}))
    save_file(weights, str(js.with_suffix(".safetensors")))
    net = load_condition_net(js)
    assert isinstance(net, GlobalGeometryCondition) and net.dtype == torch.float32 and not net.training
    with torch.no_grad():
        torch.testing.assert_close(net(agg, dino), ref, atol=1e-5, rtol=1e-5)
    assert load_condition_net(js, use_fp16=None).dtype == torch.float16  # the json's own switch


def test_training_checkpoint_with_prefix(tmp_path):
    weights, agg, dino, ref = _fixture()
    ckpt = tmp_path / "epoch=49.ckpt"
    state = {f"ss_cond.{k}": v for k, v in weights.items()}
    state["ss_flow_model.base_model.model.blocks.0.cross_attn.to_q.lora_A.default.weight"] = torch.zeros(2, 2)
    torch.save({"state_dict": state, "epoch": 49}, ckpt)
    net = load_condition_net(ckpt, name="ggc", args=TINY["args"])
    with torch.no_grad():
        torch.testing.assert_close(net(agg, dino), ref, atol=1e-5, rtol=1e-5)


def test_official_pvc_layout_and_build():
    with torch.device("meta"):
        pvc = build_condition_net("pvc")
        ggc = build_condition_net("ModulatedMultiViewCond")
    assert isinstance(pvc, LinearPerViewCondition) and isinstance(ggc, GlobalGeometryCondition)
    ref = {k: v["shape"] for k, v in MANIFEST["configs"]["pvc_official"]["keys"].items()}
    assert {k: list(v.shape) for k, v in pvc.state_dict().items()} == ref
    ref = {k: v["shape"] for k, v in MANIFEST["configs"]["ggc_official"]["keys"].items()}
    assert {k: list(v.shape) for k, v in ggc.state_dict().items()} == ref


def test_load_errors(tmp_path):
    weights, *_ = _fixture()
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"name": "ModulatedMultiViewCond", "args": TINY["args"]}))
    with pytest.raises(CheckpointError, match="c.safetensors' not found"):
        load_condition_net(js)
    save_file({k: v for k, v in weights.items() if "cond_blocks.3" not in k}, str(tmp_path / "c.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        load_condition_net(js)
    with pytest.raises(ConfigError, match="needs the condition net's class"):
        load_condition_net(tmp_path / "c.safetensors")
    with pytest.raises(ConfigError, match="unknown ReconViaGen condition net 'foo'"):
        build_condition_net("foo")
    with pytest.raises(ConfigError, match="'use_rope' other than False"):
        build_condition_net("ggc", {**TINY["args"], "use_rope": True})
    with pytest.raises(ConfigError, match="ctx_channels 2000 must be 2048"):
        build_condition_net("pvc", {"channels": 8, "ctx_channels": 2000})
