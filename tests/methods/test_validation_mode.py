"""``validation_mode: loss`` validates on the training losses alone (no reconstruct, no render)."""

from __future__ import annotations

import lightning as L
import pytest

from recon3d.data.datamodule import ReconDataModule
from recon3d.data.synthetic import SyntheticDataset
from recon3d.errors import ConfigError
from recon3d.methods.toy import ToyTriplaneModule
from recon3d.metrics import EvaluationProtocol


@pytest.mark.parametrize("mode", ["loss", "render"])
def test_validation_mode(mode, tmp_path, monkeypatch):
    ds = SyntheticDataset(num_objects=5, views_per_object=4, resolution=16, num_surface_points=16, num_sdf_points=16,
                          mesh_resolution=0, cache_dir=str(tmp_path / "cache"))
    dm = ReconDataModule(ds, num_val_objects=2, num_test_objects=1, num_input_views=2, num_target_views=2, batch_size=2, with_geometry=False)
    model = ToyTriplaneModule(evaluation=EvaluationProtocol(image_metrics=["psnr"]), validation_mode=mode)
    calls = []
    real = model.reconstruct
    monkeypatch.setattr(model, "reconstruct", lambda b: calls.append(1) or real(b))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    if mode == "loss":
        assert "val/loss" in metrics and "val/rgb" in metrics and "val/psnr" not in metrics and not calls
    else:
        assert "val/psnr" in metrics and "val/loss" not in metrics and len(calls) == 1


def test_bad_validation_mode_is_one_line():
    with pytest.raises(ConfigError, match="validation_mode: expected 'render' or 'loss'"):
        ToyTriplaneModule(validation_mode="images")


def test_unposed_inputs_are_one_line_for_methods_that_need_cameras():
    """GTR's encoder needs the input cameras (Plücker rays): unposed views give the one-line
    DataError naming the field, not an AttributeError deep in the encoder."""
    import torch

    from recon3d.data.batch import Batch, Views
    from recon3d.data.cameras import orbit_cameras
    from recon3d.errors import DataError
    from tests.methods.test_gtr import _module

    cams = orbit_cameras(torch.tensor([0.0, 90.0]), torch.tensor([10.0, 10.0]), 2.5, 40.0, 16, 16).reshape(1, 2)
    img = torch.ones(1, 2, 3, 16, 16)
    batch = Batch(["obj"], Views(img, None), Views(img, cams))
    model = _module()
    with pytest.raises(DataError, match="GTR needs inputs.cameras"):
        model.reconstruct(batch)
    with pytest.raises(DataError, match="GTR needs inputs.cameras"):
        model.training_losses(batch)
