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


# ---------------------------------------------------------------------- issue 14, item 5
class _Tied(torch.nn.Module):
    """A model whose answer is known: ``tied`` is ``head`` under a second name (shared weights)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(2, 3)
        self.bn = torch.nn.BatchNorm1d(3)
        self.head = torch.nn.Linear(3, 1)
        self.tied = self.head


def test_left_lists_exactly_the_keys_that_received_no_tensor(tmp_path):
    torch.manual_seed(0)
    src = _Tied()
    # the file holds a.*, and head.weight only under its second name
    sd = {"a.weight": src.a.weight.detach().clone(), "a.bias": src.a.bias.detach().clone(),
          "tied.weight": src.head.weight.detach().clone()}
    torch.save(sd, tmp_path / "part.pt")
    torch.manual_seed(1)
    dst = _Tied()
    init = {k: v.clone() for k, v in dst.state_dict().items()}
    left = load_weights_into(dst, tmp_path / "part.pt", strict=False)
    # received: a.weight, a.bias, tied.weight (and head.weight, the same tensor); nothing else
    assert left == ["bn.bias", "bn.num_batches_tracked", "bn.running_mean", "bn.running_var", "bn.weight",
                    "head.bias", "tied.bias"]
    got = dst.state_dict()
    for k in ("a.weight", "a.bias"):
        assert torch.equal(got[k], sd[k])
    assert torch.equal(got["head.weight"], sd["tied.weight"]) and torch.equal(got["tied.weight"], sd["tied.weight"])
    assert all(torch.equal(got[k], init[k]) for k in left)
    # strict: the tied name counts as present, only the really missing keys are reported
    with pytest.raises(CheckpointError, match=r"7 missing \(e\.g\. \['bn\.bias', 'bn\.num_batches_tracked', 'bn\.running_mean'\]\)"):
        load_weights_into(_Tied(), tmp_path / "part.pt")


def test_regex_ignore_patterns(tmp_path):
    src, dst = _toy(seed=1), _toy(seed=2)
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith(".bias")}
    path = _lightning_ckpt(tmp_path / "nobias.ckpt", sd)
    init = {k: v.clone() for k, v in dst.state_dict().items()}
    left = load_weights_into(dst, path, ignore=[r"re:.*\.bias"])
    assert left == sorted(k for k in init if k.endswith(".bias"))
    assert all(torch.equal(dst.state_dict()[k], init[k] if k in left else src.state_dict()[k]) for k in init)
    with pytest.raises(CheckpointError, match="6 missing"):  # a regex must match the whole key
        load_weights_into(_toy(), path, ignore=[r"re:bias"])
    with pytest.raises(ConfigError, match=r"model.init_weights_ignore: 're:\(' is not a valid regular expression"):
        _toy(init_weights_ignore=["re:("])


def test_reconmodule_load_state_dict_is_one_line():
    """Resume and ``load_from_checkpoint`` go through ``load_state_dict``: torch's error is
    many lines; recon3d's is the one report."""
    model = _toy()
    sd = dict(model.state_dict())
    sd["decoder.9.weight"] = sd.pop("decoder.0.weight")
    with pytest.raises(CheckpointError) as e:
        model.load_state_dict(sd)
    msg = str(e.value)
    assert "\n" not in msg and "12 of 13 model keys found; 1 missing (e.g. ['decoder.0.weight']); 1 unexpected" in msg
    del sd["decoder.9.weight"]
    model.load_state_dict(sd, strict=False)  # strict=False keeps torch's meaning: missing keys allowed


def test_hf_encoder_pretrained_path_is_strict(tmp_path):
    """transformers only logs missing/extra keys and leaves random weights; recon3d refuses."""
    from safetensors.torch import load_file, save_file
    from transformers import Dinov2Config, Dinov2Model

    from recon3d.models.encoders import DinoV2Encoder
    from recon3d.utils.checkpoint import FrozenSource, attach_frozen_parts, frozen_parts_of, strip_frozen_parts

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28, patch_size=14)
    Dinov2Model(cfg).save_pretrained(tmp_path / "dino")
    weights = tmp_path / "dino" / "model.safetensors"
    full = load_file(str(weights))
    bad = dict(full)
    del bad["layernorm.weight"]
    bad["pooler.dense.weight"] = torch.zeros(2, 2)
    save_file(bad, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        DinoV2Encoder(pretrained_path=str(tmp_path / "dino"), camera_conditioning="none")
    msg = str(e.value)
    assert "\n" not in msg and "DinoV2Encoder" in msg and "1 missing (e.g. ['layernorm.weight'])" in msg
    assert "1 unexpected (e.g. ['pooler.dense.weight'])" in msg and "pretrained_ignore" in msg
    enc = DinoV2Encoder(pretrained_path=str(tmp_path / "dino"), camera_conditioning="none",
                        pretrained_ignore=["layernorm.weight", "pooler.*"])
    loaded = enc.backbone.state_dict()
    assert torch.equal(loaded["embeddings.cls_token"], bad["embeddings.cls_token"])
    assert torch.equal(loaded["encoder.layer.0.mlp.fc1.weight"], bad["encoder.layer.0.mlp.fc1.weight"])

    # pretrained + frozen: a frozen part whose source is the directory's weight file (transformers 5
    # names some tensors differently in the file and in the module: matched by content)
    save_file(full, str(weights), metadata={"format": "pt"})
    enc = DinoV2Encoder(pretrained_path=str(tmp_path / "dino"), camera_conditioning="none", freeze_backbone=True)
    assert frozen_parts_of(enc) == {"backbone": FrozenSource(str(weights.resolve()))}
    ckpt = {"state_dict": {f"backbone.{k}": v for k, v in enc.backbone.state_dict().items()}}
    assert strip_frozen_parts(ckpt, frozen_parts_of(enc)) == {"backbone": len(full)}
    assert ckpt["state_dict"] == {}  # every tensor HF loaded is the file's
    attach_frozen_parts(ckpt)
    assert all(torch.equal(ckpt["state_dict"][f"backbone.{k}"], v) for k, v in enc.backbone.state_dict().items())


def test_lpips_and_resnet_speak_the_same_report(tmp_path):
    from recon3d.metrics.lpips import LPIPSNet
    from recon3d.models.m3d import ResNetShallowEncoder, load_torchvision_resnet

    torch.manual_seed(0)
    net = LPIPSNet("alex", pretrained=False)
    feats = {k: v for k, v in net.trunk.state_dict().items() if k != "features.0.bias"}
    with pytest.raises(CheckpointError, match=r"^alex\.pth: not a torchvision alex checkpoint: \d+ of \d+ model keys found; 1 missing"):
        net.load_backbone(feats, source="alex.pth")
    heads = {f"lin{k}": v for k, v in net.lins.state_dict().items()}
    heads["lin9.model.1.weight"] = torch.zeros(1, 3, 1, 1)
    with pytest.raises(CheckpointError, match=r"1 unexpected \(e\.g\. \['lin9\.model\.1\.weight'\]\)"):
        net.load_heads(heads, source="heads.pth")

    enc = ResNetShallowEncoder("basic", num_layers=2)  # stem + layer1
    sd = dict(enc.state_dict())
    sd["layer3.0.conv1.weight"] = torch.zeros(1)  # a stage it does not build: the explicit partial part
    sd["stem_typo.weight"] = torch.zeros(1)  # anything else is refused
    torch.save(sd, tmp_path / "r.pth")
    with pytest.raises(CheckpointError, match=r"r\.pth: weights do not match ResNetShallowEncoder: .*1 unexpected \(e\.g\. \['stem_typo\.weight'\]\)"):
        load_torchvision_resnet(enc, tmp_path / "r.pth")
    del sd["stem_typo.weight"]
    torch.save(sd, tmp_path / "r.pth")
    assert load_torchvision_resnet(enc, tmp_path / "r.pth") == ["layer3.0.conv1.weight"]
