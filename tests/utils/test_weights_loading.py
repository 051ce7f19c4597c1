"""Weights that do not fit are refused (issue 13, silent item 2): strict ``load_weights_into``,
``init_weights`` / ``init_weights_ignore`` on every ReconModule, and the checkpoint's class named.

References are the tensors saved to the file and the module's own initial tensors (compared
with ``torch.equal``), never recon3d's loader output alone.
"""

from __future__ import annotations

import logging

import pytest
import torch

from recon3d.errors import CheckpointError, ConfigError
from recon3d.methods.toy import ToyTriplaneModule
from recon3d.utils.checkpoint import checkpoint_class_mismatch, load_weights_into


def _toy(**kw) -> ToyTriplaneModule:
    torch.manual_seed(kw.pop("seed", 0))
    return ToyTriplaneModule(**kw)


def _lightning_ckpt(path, state_dict, class_path="recon3d.methods.toy.ToyTriplaneModule"):
    torch.save({"state_dict": state_dict, "hyper_parameters": {"_class_path": class_path, "lr": 1e-2}}, path)
    return path


def _fake_m3d_state_dict() -> dict[str, torch.Tensor]:
    return {"net.shallow.stem.0.weight": torch.zeros(64, 3, 7, 7), "net.deep.embed.weight": torch.zeros(8, 4, 2, 2),
            "net.decoder.layers.0.weight": torch.zeros(256, 39), "density.beta": torch.zeros(())}


def test_other_method_is_named_and_refused(tmp_path):
    model = _toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = _lightning_ckpt(tmp_path / "m3d.ckpt", _fake_m3d_state_dict(), "recon3d.methods.m3d.M3DModule")
    with pytest.raises(CheckpointError) as e:
        load_weights_into(model, path)
    msg = str(e.value)
    n = len(before)
    assert "this checkpoint is an M3DModule, the config is a ToyTriplaneModule" in msg
    assert f"0 of {n} model keys found" in msg and f"{n} missing" in msg and "4 unexpected" in msg
    assert "\n" not in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was loaded


def test_missing_keys_refused_then_allowed_by_ignore(tmp_path):
    src, dst = _toy(seed=1), _toy(seed=2)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("decoder.")}
    path = _lightning_ckpt(tmp_path / "partial.ckpt", sd)
    with pytest.raises(CheckpointError, match=r"4 missing \(e\.g\. \['decoder\.0\.bias'.*init_weights_ignore.*'decoder\.\*'"):
        load_weights_into(dst, path)
    init = {k: v.clone() for k, v in dst.state_dict().items()}
    left = load_weights_into(dst, path, ignore=["decoder.*"])
    assert sorted(left) == sorted(k for k in init if k.startswith("decoder."))
    for k, v in dst.state_dict().items():
        assert torch.equal(v, init[k] if k.startswith("decoder.") else src.state_dict()[k]), k


def test_unexpected_and_reshaped_keys_need_ignore(tmp_path):
    src, dst = _toy(seed=1), _toy(seed=2)
    sd = dict(src.state_dict())
    sd["lpips.net.0.weight"] = torch.ones(3)  # a loss network the new stage does not have
    sd["base_planes"] = torch.zeros(3, 4, 16, 16)
    path = _lightning_ckpt(tmp_path / "extra.ckpt", sd)
    with pytest.raises(CheckpointError, match=r"1 unexpected \(e\.g\. \['lpips\.net\.0\.weight'\]\); 1 with other shapes"):
        load_weights_into(dst, path)
    init_planes = dst.base_planes.detach().clone()
    left = load_weights_into(dst, path, ignore=["lpips.*", "base_planes"])
    assert left == ["base_planes"]  # the extra lpips key is dropped, not "left at its initial value"
    assert torch.equal(dst.base_planes, init_planes)
    assert torch.equal(dst.decoder[0].weight, src.decoder[0].weight)


def test_same_weights_other_class_name_loads_with_warning(tmp_path, caplog):
    src, dst = _toy(seed=1), _toy(seed=2)
    path = _lightning_ckpt(tmp_path / "renamed.ckpt", src.state_dict(), "old_package.methods.TriplaneToy")
    with caplog.at_level(logging.WARNING, logger="recon3d.utils.checkpoint"):
        load_weights_into(dst, path)
    assert "this checkpoint is a TriplaneToy, the config is a ToyTriplaneModule, but its weights fit" in caplog.text
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items())


def test_class_mismatch_wording():
    ck = {"hyper_parameters": {"_class_path": "recon3d.methods.m3d.M3DModule"}}
    assert checkpoint_class_mismatch(ck, "recon3d.methods.gtr.GTRModule") == "this checkpoint is an M3DModule, the config is a GTRModule"
    assert checkpoint_class_mismatch(ck, "recon3d.methods.M3DModule") is None
    assert checkpoint_class_mismatch({"state_dict": {}}, "recon3d.methods.gtr.GTRModule") is None


def test_init_weights_is_strict_in_setup(tmp_path):
    """``--model.init_args.init_weights`` used to load with strict=False: 0 shared keys passed."""
    path = _lightning_ckpt(tmp_path / "m3d.ckpt", _fake_m3d_state_dict(), "recon3d.methods.m3d.M3DModule")
    model = _toy(init_weights=str(path))
    with pytest.raises(CheckpointError, match="this checkpoint is an M3DModule, the config is a ToyTriplaneModule"):
        model.setup("fit")
    src = _toy(seed=3)
    partial = _lightning_ckpt(tmp_path / "p.ckpt", {k: v for k, v in src.state_dict().items() if k != "base_planes"})
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. \['base_planes'\]\)"):
        _toy(init_weights=str(partial)).setup("fit")
    model = _toy(init_weights=str(partial), init_weights_ignore=["base_planes"])
    init = model.base_planes.detach().clone()
    model.setup("fit")
    assert torch.equal(model.base_planes, init) and torch.equal(model.decoder[2].weight, src.decoder[2].weight)


def test_init_weights_ignore_must_be_patterns():
    with pytest.raises(ConfigError, match="model.init_weights_ignore: expected a list of glob patterns"):
        _toy(init_weights_ignore="lpips.*")
