"""LGM's official weight layout, checked against a manifest generated from upstream's own classes.

``tests/fixtures/lgm/official_manifest.json`` was written by ``scripts/make_lgm_manifest.py``
from ``3DTopia/LGM``'s ``core.models.LGM`` (its ``UNet`` + the extra 1x1 ``conv``) for the
official ``big`` / ``small`` options and recon3d's ``tiny`` sizes, so these tests compare recon3d
with upstream's class definitions, not with a saver written beside the loader.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from recon3d.errors import CheckpointError
from recon3d.models.lgm import LGMNetwork, convert_official_state_dict, load_official_lgm, official_key_table

MANIFEST = json.loads((Path(__file__).resolve().parents[2] / "fixtures" / "lgm" / "official_manifest.json").read_text())


def _manifest(preset: str) -> dict[str, tuple[list[int], str]]:
    return {k: (v["shape"], v["dtype"]) for k, v in MANIFEST["configs"][preset]["keys"].items()}


def _meta_net(preset: str) -> LGMNetwork:
    with torch.device("meta"):  # big has 415M parameters: shapes only
        return LGMNetwork(preset)


def _fp16_file(tmp_path: Path, preset: str, drop: str | None = None, extra: str | None = None, reshape: str | None = None) -> tuple[Path, dict]:
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=g).half() for k, (shape, _) in _manifest(preset).items()}
    state["lpips_loss.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3).half()  # upstream's loss: skipped on load
    if drop:
        del state[drop]
    if extra:
        state[extra] = torch.zeros(3).half()
    if reshape:
        state[reshape] = torch.zeros(7).half()
    path = tmp_path / "model_fp16_fixrot.safetensors"
    save_file(state, str(path))
    return path, state


def test_manifest_comes_from_upstream_lgm():
    src = MANIFEST["source"]
    assert src["repo"] == "3DTopia/LGM" and len(src["commit"]) == 40
    # The generating script also ran recon3d against upstream's forward and rays at tiny size.
    assert MANIFEST["checks"]["tiny_forward_gaussians_max_abs_diff"] < 1e-4
    assert MANIFEST["checks"]["rays_plucker_max_abs_diff"] < 1e-5
    assert MANIFEST["configs"]["big"]["options"]["splat_size"] == 128


@pytest.mark.parametrize("preset", ["big", "small", "tiny"])
def test_state_dict_equals_upstream_manifest(preset):
    net = _meta_net(preset)
    ours = {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in net.state_dict().items()}
    ref = _manifest(preset)
    assert sorted(set(ours) ^ set(ref)) == []
    assert ours == ref


@pytest.mark.parametrize("preset", ["big", "tiny"])
def test_key_table_enumerates_the_manifest(preset):
    assert set(official_key_table(_meta_net(preset))) == set(_manifest(preset))


def test_big_manifest_is_the_paper_model():
    net = _meta_net("big")
    assert net.num_gaussians == 4 * 128 * 128 == 65536
    n_params = sum(int(torch.Size(s).numel()) for s, _ in _manifest("big").values())
    assert n_params == sum(p.numel() for p in net.parameters())
    assert 4.0e8 < n_params < 4.3e8  # LGM big: ~415M parameters
    lora = [k for k in _manifest("big") if re.fullmatch(r"unet\..*attns\.\d+\.attn\.(qkv|proj)\.weight", k)]
    assert len(lora) == 2 * 16  # 16 MVAttention modules in big, each with qkv and proj


def test_big_layout_converts_on_meta():
    net = _meta_net("big")
    state = {k: torch.empty(shape, dtype=torch.float16, device="meta") for k, (shape, _) in _manifest("big").items()}
    out = convert_official_state_dict(state, net)
    assert set(out) == set(net.state_dict()) and all(v.dtype == torch.float32 for v in out.values())


def test_synthetic_fp16_file_loads_strictly_as_float32(tmp_path):
    path, state = _fp16_file(tmp_path, "tiny")
    net = load_official_lgm(path, LGMNetwork("tiny"))
    sd = net.state_dict()
    assert all(v.dtype == torch.float32 for v in sd.values())
    for k, v in sd.items():
        assert torch.equal(v, state[k].float()), k
    assert not any(k.startswith("lpips_loss") for k in sd)


@pytest.mark.parametrize("case", ["drop", "extra", "reshape"])
def test_mismatched_file_is_one_clear_line(tmp_path, case):
    key = "unet.down_blocks.1.attns.0.attn.qkv.weight"
    kwargs = {"drop": key} if case == "drop" else {"extra": "unet.foo.weight"} if case == "extra" else {"reshape": key}
    path, _ = _fp16_file(tmp_path, "tiny", **kwargs)
    with pytest.raises(CheckpointError) as err:
        load_official_lgm(path, LGMNetwork("tiny"))
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    want = {"drop": ["1 missing", key], "extra": ["1 unexpected", "unet.foo.weight"], "reshape": ["other shapes", key]}[case]
    assert all(w in msg for w in want), msg


def test_wrong_preset_is_refused(tmp_path):
    path, _ = _fp16_file(tmp_path, "tiny")
    net = LGMNetwork(None, down_channels=(32, 64), down_attention=(False, True), mid_attention=True, up_channels=(64,), up_attention=(False,))
    with pytest.raises(CheckpointError, match="unexpected"):
        load_official_lgm(path, net)


def test_missing_file_names_it_and_where_to_get_it(tmp_path):
    with pytest.raises(CheckpointError, match="model_fp16_fixrot.safetensors.*huggingface.co/ashawkey/LGM"):
        load_official_lgm(tmp_path / "nope.safetensors", LGMNetwork("tiny"))


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RECON3D_LGM_UPSTREAM"),
                    reason="set RECON3D_LGM_UPSTREAM to a 3DTopia/LGM checkout or git dir to regenerate the manifest")
def test_manifest_regenerates_from_upstream(tmp_path):
    out = tmp_path / "manifest.json"
    script = Path(__file__).resolve().parents[3] / "scripts" / "make_lgm_manifest.py"
    run = subprocess.run([sys.executable, str(script), os.environ["RECON3D_LGM_UPSTREAM"], "--rev", MANIFEST["source"]["commit"],
                          "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(out.read_text())["configs"] == MANIFEST["configs"]
