"""What TrellisModule takes when the config does not say: the SLAT normalisation from the SLAT flow's
own checkpoint (or pipeline.json), refused when nowhere, checked against given values; the sampler
defaults (TRELLIS-image-large's pipeline.json) and the one warning naming them."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from recon3d.errors import CheckpointError, ConfigError
from recon3d.methods.trellis import DEFAULT_SLAT_SAMPLER, DEFAULT_SS_SAMPLER, TrellisModule, checkpoint_slat_normalization
from recon3d.methods.trellis_slat import TrellisSLatFlowModule
from recon3d.models.trellis import SLatFlowModel, SparseStructureDecoder, SparseStructureFlowModel
from recon3d.models.trellis.conditioning import TrellisImageCondition
from recon3d.models.trellis.slat_vae import SLatEncoder

DINO = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=14, image_size=28,
            num_register_tokens=4)
MEAN = [0.5, -1.25, 0.125, 2.0]
STD = [1.5, 0.75, 2.25, 0.5]


def _condition() -> TrellisImageCondition:
    torch.manual_seed(0)
    return TrellisImageCondition(config=DINO, image_size=28)


def _slat_flow() -> SLatFlowModel:
    return SLatFlowModel(8, 4, 32, 16, 4, num_blocks=1, num_heads=2, mlp_ratio=2, patch_size=2, num_io_res_blocks=1,
                         io_block_channels=[16], qk_rms_norm=True)


def _trellis(**kw) -> TrellisModule:
    torch.manual_seed(0)
    args = dict(condition=_condition(), ss_flow=SparseStructureFlowModel(4, 4, 32, 16, 4, num_blocks=1, num_heads=2, mlp_ratio=2,
                                                                          patch_size=1, qk_rms_norm=True),
                ss_decoder=SparseStructureDecoder(1, 4, 1, [16, 8], num_res_blocks_middle=1), slat_flow=_slat_flow())
    args.update(kw)
    return TrellisModule(**args)


@pytest.fixture(scope="module")
def stage_files(tmp_path_factory):
    """A SLAT-flow stage (TrellisSLatFlowModule) saved as a Lightning-style .ckpt and as .safetensors,
    its flow alone (no normalisation), and a stage whose normalisation was never computed."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("slat_stage")
    torch.manual_seed(4)
    enc = SLatEncoder(8, 16, 32, 4, num_blocks=1, num_heads=2, mlp_ratio=2, attn_mode="full")
    stage = TrellisSLatFlowModule(_slat_flow(), enc, _condition(), slat_mean=MEAN, slat_std=STD)
    sd = {k: v.contiguous() for k, v in stage.state_dict().items()}
    files = {"ckpt": d / "last.ckpt", "st": d / "stage.safetensors", "flow": d / "flow.safetensors", "unready": d / "unready.ckpt"}
    torch.save({"state_dict": sd, "global_step": 3}, files["ckpt"])
    save_file(sd, str(files["st"]))
    save_file({k: v.contiguous() for k, v in stage.flow.state_dict().items()}, str(files["flow"]))
    fresh = TrellisSLatFlowModule(_slat_flow(), enc, _condition())  # normalisation left to compute (never done)
    torch.save({"state_dict": fresh.state_dict()}, files["unready"])
    return files, stage


def test_slat_normalisation_is_read_from_the_slat_flow_stage_checkpoint(stage_files):
    files, stage = stage_files
    for f in ("ckpt", "st"):
        model = _trellis(part_weights={"slat_flow": {"path": str(files[f]), "prefix": "flow."}})
        assert torch.equal(model.slat_mean, stage.slat_mean) and torch.equal(model.slat_std, stage.slat_std), f
        for k, v in stage.flow.state_dict().items():
            assert torch.equal(model.slat_flow.state_dict()[k], v), k


def test_a_slat_flow_file_without_normalisation_is_refused_naming_key_and_file(stage_files):
    files, _ = stage_files
    with pytest.raises(CheckpointError, match=r"flow\.safetensors: no SLAT normalisation .*'slat_mean'.*model\.slat_mean"):
        _trellis(part_weights={"slat_flow": str(files["flow"])})
    # a stage that never computed its normalisation (normalization_ready false) has none either
    assert checkpoint_slat_normalization(str(files["unready"]), "flow.") is None
    with pytest.raises(CheckpointError, match="unready.ckpt: no SLAT normalisation"):
        _trellis(part_weights={"slat_flow": {"path": str(files["unready"]), "prefix": "flow."}})
    # given by hand, the same file is fine
    model = _trellis(part_weights={"slat_flow": str(files["flow"])}, slat_mean=MEAN, slat_std=STD)
    assert model.slat_std.tolist() == STD


def test_given_normalisation_must_match_the_checkpoints(stage_files):
    files, _ = stage_files
    pw = {"slat_flow": {"path": str(files["ckpt"]), "prefix": "flow."}}
    with pytest.raises(ConfigError, match=r"model.slat_mean / slat_std: differ from the SLAT normalisation stored in .*last\.ckpt"):
        _trellis(part_weights=pw, slat_mean=[0.0] * 4, slat_std=[1.0] * 4)
    # a 4-decimal copy of the logged values is the same normalisation
    model = _trellis(part_weights=pw, slat_mean=[round(x + 4e-5, 4) for x in MEAN], slat_std=STD)
    assert torch.allclose(model.slat_mean, torch.tensor(MEAN), atol=1e-4)
    with pytest.raises(ConfigError, match="give both"):
        _trellis(part_weights=pw, slat_mean=MEAN)


def _pipeline_folder(tmp_path, norm) -> str:
    """A pipeline folder whose SLAT flow is a real (tiny) checkpoint and whose pipeline.json carries
    ``norm``; the SS parts are given to TrellisModule directly."""
    from safetensors.torch import save_file

    ck = tmp_path / "ckpts"
    ck.mkdir(exist_ok=True)
    args = {"resolution": 8, "in_channels": 4, "model_channels": 32, "cond_channels": 16, "out_channels": 4, "num_blocks": 1,
            "num_heads": 2, "mlp_ratio": 2, "patch_size": 2, "num_io_res_blocks": 1, "io_block_channels": [16], "qk_rms_norm": True}
    (ck / "slat_flow.json").write_text(json.dumps({"name": "SLatFlowModel", "args": args}))
    save_file({k: v.contiguous() for k, v in _slat_flow().state_dict().items()}, str(ck / "slat_flow.safetensors"))
    sampler = {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": 1e-5},
               "params": {"steps": 25, "cfg_strength": 5.0, "cfg_interval": [0.5, 1.0], "rescale_t": 3.0}}
    pipe = {"name": "TrellisImageTo3DPipeline", "args": {
        "models": {"sparse_structure_decoder": "ckpts/ss_dec", "sparse_structure_flow_model": "ckpts/ss_flow",
                   "slat_flow_model": "ckpts/slat_flow"},
        "sparse_structure_sampler": sampler, "slat_sampler": sampler, "slat_normalization": norm,
        "image_cond_model": "dinov2_vitl14_reg"}}
    (tmp_path / "pipeline.json").write_text(json.dumps(pipe))
    return str(tmp_path)


def test_pipeline_normalisation_is_checked_against_given_values(tmp_path):
    folder = _pipeline_folder(tmp_path, {"mean": MEAN, "std": STD})
    parts = dict(ss_flow=SparseStructureFlowModel(4, 4, 32, 16, 4, num_blocks=1, num_heads=2, mlp_ratio=2, patch_size=1),
                 ss_decoder=SparseStructureDecoder(1, 4, 1, [16, 8], num_res_blocks_middle=1))
    model = TrellisModule(condition=_condition(), slat_flow=None, pipeline=folder, **parts)
    assert model.slat_mean.tolist() == MEAN and model.slat_std.tolist() == STD
    with pytest.raises(ConfigError, match=r"differ from the SLAT normalisation stored in .*pipeline\.json \(args\.slat_normalization\)"):
        TrellisModule(condition=_condition(), slat_flow=None, pipeline=folder, slat_mean=[0.0] * 4, slat_std=[1.0] * 4, **parts)
    # an official-style flow file (no normalisation inside) loaded by hand takes the pipeline's
    model = TrellisModule(condition=_condition(), slat_flow=_slat_flow(), pipeline=folder,
                          part_weights={"slat_flow": str(tmp_path / "ckpts/slat_flow.safetensors")}, **parts)
    assert model.slat_std.tolist() == STD


def test_sampler_defaults_are_trellis_image_large_pipeline_values():
    # TRELLIS-image-large's pipeline.json sampler entries, written out here in upstream's layout
    # (trellis_image_to_3d.py from_pretrained reads name / args / params), read by recon3d's reader.
    entry = {"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": 1e-5},
             "params": {"steps": 25, "cfg_strength": 5.0, "cfg_interval": [0.5, 1.0], "rescale_t": 3.0}}
    from recon3d.models.trellis.pipeline_config import _sampler

    kw = _sampler({"s": entry}, "s", None).sampler_kwargs()
    kw.pop("cfg_convention")
    assert kw == DEFAULT_SS_SAMPLER and kw == DEFAULT_SLAT_SAMPLER


def test_defaults_used_without_a_pipeline_are_said_once(caplog):
    model = _trellis(ss_sampler={"steps": 2}, slat_sampler={"steps": 2, "cfg_strength": 1.0}).eval()
    with caplog.at_level(logging.WARNING, logger="recon3d.methods.trellis"):
        model._sampler(model.ss_sampler_params, 1)
        model._sampler(model.slat_sampler_params, 1)
    lines = [r.getMessage() for r in caplog.records if "no model.pipeline" in r.getMessage()]
    assert len(lines) == 1, lines
    line = lines[0]
    # the defaults taken, not the values given
    assert "ss_sampler cfg_strength=5.0, cfg_interval=(0.5, 1.0), rescale_t=3.0, sigma_min=1e-05" in line
    assert "slat_sampler cfg_interval=(0.5, 1.0), rescale_t=3.0, sigma_min=1e-05" in line
    assert "steps=" not in line and "cfg_strength=1.0" not in line
    assert model.ss_sampler_params["cfg_strength"] == DEFAULT_SS_SAMPLER["cfg_strength"]
    # everything given: nothing to say
    full = {k: v for k, v in DEFAULT_SS_SAMPLER.items()}
    quiet = _trellis(ss_sampler=full, slat_sampler=full)
    assert quiet.warn_sampler_defaults() is None
