"""MVBoost's boosting on its paper's base, LGM (tiny, CPU): the default adapters sit exactly on the
U-Net's cross-view attention (every MVAttention's qkv and proj), rank 32; boosting lowers the loss
with every LGM weight bit-identical; the adapter file round-trips into a fresh LGM; merging
equals the unmerged model. Skipped where recon3d.methods.lgm is absent."""

from __future__ import annotations

import pytest
import torch

lgm = pytest.importorskip("recon3d.methods.lgm")

from recon3d.adapters import add_lora, load_lora, lora_layers, read_lora_config  # noqa: E402
from recon3d.data.datamodule import ReconDataModule  # noqa: E402
from recon3d.data.synthetic import SyntheticDataset  # noqa: E402
from recon3d.methods.boost import BoostModule  # noqa: E402
from recon3d.models.lgm import LGMNetwork  # noqa: E402
from recon3d.models.lgm.unet import MVAttention  # noqa: E402


def _lgm() -> lgm.LGMModule:
    torch.manual_seed(0)
    # No augmentation: the loss is a deterministic function of the weights. LPIPS weights cannot
    # exist on a CI machine (LPIPS itself is tested in tests/metrics).
    return lgm.LGMModule(network=LGMNetwork("tiny", num_views=4), lambda_lpips=0.0, augment=False)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    ds = SyntheticDataset(num_objects=2, views_per_object=12, resolution=16, fov_deg=49.1, elevation_range=[0.0, 30.0],
                          num_surface_points=64, num_sdf_points=64, mesh_resolution=0, camera_layout="fixed",
                          cache_dir=str(tmp_path_factory.mktemp("boost_lgm")))
    dm = ReconDataModule(ds, num_val_objects=0, num_test_objects=0, num_input_views=4, num_target_views=2,
                         supervise_inputs=True, train_view_sampling="fixed_inputs", batch_size=2, with_geometry=False)
    return next(iter(dm.train_dataloader()))


def _render(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.render_views(batch, batch.targets.cameras)["rgb"]


def test_default_adapters_are_the_cross_view_attention_at_rank_32():
    model = BoostModule(_lgm())
    net = model.base.net
    expected = {f"{n}.attn.{p}" for n, m in net.named_modules() if isinstance(m, MVAttention) for p in ("qkv", "proj")}
    assert expected and set(lora_layers(model.adapted)) == expected
    assert model.submodule == "net" and model.lora_config.r == 32
    assert all(layer.r["default"] == 32 for layer in lora_layers(model.adapted).values())


def test_boosting_lgm_lowers_the_loss_and_keeps_lgm_bit_identical(batch, tmp_path):
    base = _lgm()
    plain = _render(base, batch)
    model = BoostModule(base, lr=5e-3)
    assert torch.equal(_render(model, batch), plain)  # B = 0: the base's outputs exactly
    before = {k: v.clone() for k, v in model.base_state_dict().items()}
    opt = model.configure_optimizers()
    model.train()
    losses = []
    for _ in range(8):
        loss = model.training_losses(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses
    after = model.base_state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)

    boosted = _render(model, batch)
    path = model.save_adapters(tmp_path / "adapters.safetensors")
    fresh = _lgm()
    load_lora(add_lora(fresh.net, read_lora_config(path)), path)
    assert torch.equal(_render(fresh, batch), boosted)

    model.merge_adapters()
    assert not lora_layers(model.base)
    assert model.base.state_dict().keys() == _lgm().state_dict().keys()
    merged = _render(model, batch)
    assert torch.allclose(merged, boosted, atol=1e-5), (merged - boosted).abs().max()
    assert not torch.equal(merged, plain)


def test_released_lgm_weights_load_through_the_lgm_importer(tmp_path):
    """A file in model_fp16_fixrot.safetensors' layout (``unet.*``, ``conv.*``, float16) is read
    by LGM's importer into the base's network in float32."""
    from safetensors.torch import save_file

    torch.manual_seed(7)
    released = LGMNetwork("tiny", num_views=4)
    half = {k: v.detach().half().contiguous() for k, v in released.state_dict().items()}
    path = tmp_path / "model_fp16_fixrot.safetensors"
    save_file(half, str(path))
    model = BoostModule(_lgm(), official_weights=str(path), rank=4, alpha=4.0)
    got = {k.replace(".base_layer.", "."): v for k, v in model.adapted.state_dict().items() if ".lora_" not in k}
    assert got.keys() == half.keys()
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], half[k].float()) for k in half)
