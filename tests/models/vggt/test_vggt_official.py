"""VGGTNetwork against upstream's layout and numbers (manifest + tiny forward reference from
scripts/make_vggt_manifest.py, built from the VGGT classes ReconViaGen vendors) and its strict loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from recon3d.errors import CheckpointError
from recon3d.models.vggt import VGGTNetwork, vggt_config
from recon3d.models.vggt.pretrained import IGNORED_PREFIXES, convert_official_state_dict, load_official_vggt, official_key_table

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "vggt"
MANIFEST = json.loads((FIXTURES / "official_manifest.json").read_text())


def _official_keys(name: str) -> dict[str, list[int]]:
    return {k: v["shape"] for k, v in MANIFEST["configs"][name]["keys"].items() if not k.startswith(IGNORED_PREFIXES)}


@pytest.mark.parametrize("name", ["tiny", "paper"])
def test_key_table_and_network_match_the_upstream_manifest(name):
    want = _official_keys(name)
    cfg = vggt_config(name)
    assert set(official_key_table(cfg)) == set(want)
    with torch.device("meta"):
        net = VGGTNetwork(name)
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert ours == want
    # the only upstream keys recon3d does not hold are the track head's
    skipped = set(MANIFEST["configs"][name]["keys"]) - set(ours)
    assert skipped and all(k.startswith("track_head.") for k in skipped)


def _deterministic(state_keys: dict) -> dict[str, torch.Tensor]:
    """The weight rule of scripts/make_vggt_manifest.py, over upstream's full key list (incl. track head)."""
    special = ("camera_token", "register_token", "register_tokens", "cls_token", "pos_embed", "empty_pose_tokens", "mask_token")
    out = {}
    for i, (key, v) in enumerate(sorted(state_keys.items())):
        shape = v["shape"]
        g = torch.Generator().manual_seed(i)
        std = 0.2 if len(shape) < 2 or key.endswith(special) else float(torch.tensor(shape[1:]).prod()) ** -0.5
        out[key] = std * torch.randn(shape, generator=g, dtype=torch.float32)
    return out


def test_forward_equals_upstream_reference():
    ref = load_file(str(FIXTURES / "tiny_forward.safetensors"))
    net = VGGTNetwork("tiny").eval()
    net.load_state_dict(convert_official_state_dict(_deterministic(MANIFEST["configs"]["tiny"]["keys"]), net), strict=True)
    with torch.no_grad():
        out = net(ref["images"])
    for i, t in enumerate(out["tokens"]):
        torch.testing.assert_close(t, ref[f"tokens.{i}"], atol=1e-5, rtol=1e-5)
    for k in ("pose_enc", "depth", "world_points", "world_points_conf"):
        torch.testing.assert_close(out[k], ref[k], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["depth_conf"], ref["depth_conf"], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_synthetic_official_file_loads_strictly(tmp_path, fmt):
    state = {k: v.half() for k, v in _deterministic(MANIFEST["configs"]["tiny"]["keys"]).items()}  # track head included
    if fmt == "pt":
        torch.save(state, tmp_path / "model.pt")
    else:
        save_file(state, str(tmp_path / "model.safetensors"))
        (tmp_path / "config.json").write_text(json.dumps({"img_size": 28, "patch_size": 14, "embed_dim": 32}))
    net = load_official_vggt(tmp_path, VGGTNetwork("tiny"))
    key = "aggregator.frame_blocks.0.attn.q_norm.weight"
    torch.testing.assert_close(net.state_dict()[key], state[key].float())


def test_wrong_prefixes_missing_and_reshaped_keys_are_one_line(tmp_path):
    net = VGGTNetwork("tiny")
    good = _deterministic(MANIFEST["configs"]["tiny"]["keys"])
    prefixed = {f"model.{k}": v for k, v in good.items()}
    torch.save(prefixed, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError) as e:
        load_official_vggt(tmp_path / "wrong.pt", net)
    msg = str(e.value)
    assert "\n" not in msg and "missing" in msg and "unexpected" in msg and "model.aggregator" in msg and "expected aggregator." in msg
    bad = dict(good)
    bad.pop("aggregator.camera_token")
    bad["depth_head.norm.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. \['aggregator\.camera_token'\]\).*other shapes"):
        convert_official_state_dict(bad, net)
    (tmp_path / "d").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "d" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no config.json"):
        load_official_vggt(tmp_path / "d", net)
    (tmp_path / "d" / "config.json").write_text(json.dumps({"img_size": 518, "patch_size": 14, "embed_dim": 1024}))
    with pytest.raises(CheckpointError, match="differ from the network"):
        load_official_vggt(tmp_path / "d", net)
    with pytest.raises(CheckpointError, match="not found"):
        load_official_vggt(tmp_path / "absent.pt", net)
