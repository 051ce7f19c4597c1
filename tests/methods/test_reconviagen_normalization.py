"""ReconViaGenModule's SLAT normalisation: read from the SLAT stage checkpoint, given values checked
against it, a stage checkpoint without it refused (one line naming the file and the keys); its
predicted cameras flagged for the pose metrics when VGGT has no pretrained weights."""

from __future__ import annotations

import pytest
import torch

from recon3d.errors import CheckpointError, ConfigError
from recon3d.methods.reconviagen import ReconViaGenModule, ReconViaGenSLatFlowModule
from recon3d.models.reconviagen import GlobalGeometryCondition, PerViewCondition
from recon3d.models.trellis import SLatFlowModel, SparseStructureDecoder, SparseStructureFlowModel
from recon3d.models.trellis.conditioning import TrellisImageCondition
from recon3d.models.trellis.slat_vae import SLatEncoder
from recon3d.models.vggt import VGGTNetwork

DINO = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=14, image_size=28,
            num_register_tokens=4)
LAYERS = [0, 1, 2, 3]
MEAN = [0.25, -0.5, 1.0, -2.0]
STD = [0.5, 1.25, 2.0, 0.75]


def _vggt() -> VGGTNetwork:
    torch.manual_seed(0)
    return VGGTNetwork("tiny")


def _dino() -> TrellisImageCondition:
    torch.manual_seed(0)
    return TrellisImageCondition(config=DINO, image_size=28)


def _pvc() -> PerViewCondition:
    torch.manual_seed(2)
    return PerViewCondition(channels=16, vggt_channels=64, num_tokens=6, num_heads=2, mlp_ratio=2, layers=LAYERS, init_std=0.02)


def _slat_flow() -> SLatFlowModel:
    torch.manual_seed(4)
    return SLatFlowModel(8, 4, 32, 16, 4, num_blocks=1, num_heads=2, mlp_ratio=2, patch_size=2, num_io_res_blocks=1,
                         io_block_channels=[16], qk_rms_norm=True)


def _module(**kw) -> ReconViaGenModule:
    torch.manual_seed(1)
    ggc = GlobalGeometryCondition(channels=16, vggt_channels=64, num_tokens=8, num_heads=2, mlp_ratio=2, layers=LAYERS, init_std=0.02)
    args = dict(vggt=_vggt(), ss_flow=SparseStructureFlowModel(4, 4, 32, 16, 4, num_blocks=1, num_heads=2, mlp_ratio=2, patch_size=1),
                ss_decoder=SparseStructureDecoder(1, 4, 1, [16, 8], num_res_blocks_middle=1), slat_flow=_slat_flow(), ggc=ggc,
                pvc=_pvc())
    args.update(kw)
    return ReconViaGenModule(**args)


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """A ReconViaGen SLAT stage checkpoint with its normalisation, and the same without it."""
    d = tmp_path_factory.mktemp("rvg_slat_stage")
    enc = SLatEncoder(8, 16, 32, 4, num_blocks=1, num_heads=2, attn_mode="full")
    m = ReconViaGenSLatFlowModule(_slat_flow(), enc, _dino(), _pvc(), _vggt(), flow_finetune="full", slat_mean=MEAN, slat_std=STD)
    with torch.no_grad():  # a trained-looking flow: weights that differ from a fresh one
        for p in m.flow.parameters():
            p.add_(0.01)
    sd = m.state_dict()
    torch.save({"state_dict": sd}, d / "with.ckpt")
    torch.save({"state_dict": {k: v for k, v in sd.items() if k not in ("slat_mean", "slat_std", "normalization_ready")}},
               d / "without.ckpt")
    return d, m


def test_slat_stage_normalisation_is_used_and_given_values_are_checked(stage):
    d, m = stage
    rvg = _module(slat_stage=str(d / "with.ckpt"))
    assert rvg.slat_mean.tolist() == MEAN and rvg.slat_std.tolist() == STD
    assert torch.equal(rvg.slat_flow.input_layer.weight, m.flow.input_layer.weight)
    same = _module(slat_stage=str(d / "with.ckpt"), slat_mean=MEAN, slat_std=STD)
    assert same.slat_std.tolist() == STD
    with pytest.raises(ConfigError, match=r"differ from the SLAT normalisation stored in .*with\.ckpt \(model\.slat_stage\)"):
        _module(slat_stage=str(d / "with.ckpt"), slat_mean=[0.0] * 4, slat_std=[1.0] * 4)


def test_slat_stage_without_normalisation_is_refused(stage):
    d, _ = stage
    with pytest.raises(CheckpointError, match=r"without\.ckpt: no SLAT normalisation for model\.slat_stage .*'slat_mean'"):
        _module(slat_stage=str(d / "without.ckpt"))
    rvg = _module(slat_stage=str(d / "without.ckpt"), slat_mean=MEAN, slat_std=STD)
    assert rvg.slat_mean.tolist() == MEAN


def test_cameras_of_a_vggt_without_pretrained_weights_are_flagged(tmp_path):
    from recon3d.data.datamodule import ReconDataModule
    from recon3d.data.synthetic import SyntheticDataset

    ds = SyntheticDataset(num_objects=1, views_per_object=3, resolution=28, num_surface_points=64, num_sdf_points=64,
                          mesh_resolution=0, cache_dir=str(tmp_path / "data"))
    batch = next(iter(ReconDataModule(ds, num_val_objects=0, num_test_objects=0, num_input_views=2, num_target_views=1,
                                      batch_size=1, with_geometry=False).train_dataloader()))
    rvg = _module(ss_sampler={"steps": 1}, slat_sampler={"steps": 1}).eval()
    rec = rvg.reconstruct(batch)
    assert rec.cameras is not None and rec.extras["pretrained_camera_head"] is False
    assert "without pretrained weights (no model.vggt_weights)" in rec.extras["pose_caveat"]
    torch.save(_vggt().state_dict(), tmp_path / "model.pt")  # stands in for the released file (upstream's layout)
    st = _module(vggt_weights=str(tmp_path / "model.pt")).camera_head_status()
    assert st["pretrained_camera_head"] is True and st["pose_caveat"] is None
