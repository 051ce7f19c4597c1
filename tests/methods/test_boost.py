"""MVBoost's boosting (BoostModule) on a tiny GTR on CPU: the loss falls while every base weight
stays bit-identical, the adapters start as the identity, the adapter-only file written at the
end of fit round-trips into a fresh base, merging equals the unmerged model, and bad options
fail in one line. The conformance suite runs configs/mvboost_gtr_cpu.yaml (``-k mvboost``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recon3d.adapters import add_lora, load_lora, lora_layers, read_lora_config
from recon3d.data.datamodule import ReconDataModule
from recon3d.data.synthetic import SyntheticDataset
from recon3d.errors import CheckpointError, ConfigError
from recon3d.methods.boost import BoostModule
from recon3d.methods.gtr import GTRModule
from recon3d.models.encoders import ConvPatchEncoder
from recon3d.models.gtr import TriplaneField, TriplaneGenerator

ROOT = Path(__file__).resolve().parents[2]
ATTN = ("to_q", "to_k", "to_v", "to_out")
LAYERS = 2


def _gtr(seed: int = 0) -> GTRModule:
    """A tiny GTR; deterministic training (no ray jitter) so losses compare exactly."""
    torch.manual_seed(seed)
    return GTRModule(
        encoder=ConvPatchEncoder(width=32, patch_size=8),
        generator=TriplaneGenerator(width=32, num_layers=LAYERS, num_heads=2, head_dim=16, plane_resolution=4,
                                    plane_channels=4, upsample_factor=2),
        field=TriplaneField(plane_channels=4, hidden_dim=16),
        n_samples=8, patch_size=None, lambda_lpips=0.0, stratified_jitter=False, turntable_frames=0,
    )


def _boost(base=None, **kw) -> BoostModule:
    args = dict(rank=4, alpha=8.0, lr=1e-2)
    args.update(kw)
    return BoostModule(_gtr() if base is None else base, **args)


def _datamodule(cache: Path) -> ReconDataModule:
    ds = SyntheticDataset(num_objects=3, views_per_object=6, resolution=16, num_surface_points=64, num_sdf_points=64,
                          mesh_resolution=0, cache_dir=str(cache))
    return ReconDataModule(ds, num_val_objects=0, num_test_objects=0, num_input_views=2, num_target_views=2,
                           batch_size=2, supervise_inputs=False, with_geometry=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("boost_data")


@pytest.fixture(scope="module")
def batch(cache):
    return next(iter(_datamodule(cache).train_dataloader()))


def _render(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.render_views(batch, batch.targets.cameras)["rgb"]


def _steps(model: BoostModule, batch, n: int) -> list[float]:
    opt = model.configure_optimizers()
    model.train()
    losses = []
    for _ in range(n):
        loss = model.training_losses(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _loss(model, batch) -> float:
    model.train()  # the training loss as training computes it (no jitter: deterministic)
    with torch.no_grad():
        return float(model.training_losses(batch)["loss"])


def test_adapters_only_on_the_self_attention_and_only_they_train():
    model = _boost()
    expected = {f"generator.blocks.{i}.attn.{p}" for i in range(LAYERS) for p in ATTN}
    assert set(lora_layers(model.adapted)) == expected  # names relative to GTRModule.net
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"base.net.{t}.lora_{ab}.default.weight" for t in expected for ab in "AB"}
    # r * (in + out) per layer: 32-wide tokens, 2 heads x 16 inner width
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == LAYERS * 4 * 4 * (32 + 32)


def test_untrained_adapters_compute_the_base_model(batch):
    base = _gtr()
    plain = _render(base, batch)
    assert torch.equal(_render(_boost(base), batch), plain)  # B = 0: exactly the base's outputs


def test_boosting_lowers_the_loss_and_keeps_every_base_weight_bit_identical(batch):
    model = _boost()
    before = {k: v.clone() for k, v in model.base_state_dict().items()}
    assert any(".base_layer." in k for k in before) and len(before) > 20
    loss0 = _loss(model, batch)
    _steps(model, batch, 25)
    loss1 = _loss(model, batch)
    assert loss1 < 0.85 * loss0, (loss0, loss1)  # a random tiny base: rank-4 adapters move it ~25 % in 25 steps
    after = model.base_state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed
    assert all(v.abs().sum() > 0 for k, v in model.adapter_state_dict().items() if k.endswith("lora_B.weight"))


def test_render_objective_is_eq6_and_lowers_the_loss(batch):
    model = _boost(objective="render", lambda_lpips=0.0)  # LPIPS weights: tests/metrics
    terms = model.training_losses(batch)
    out = model.render_views(batch, batch.targets.cameras)["rgb"]
    assert torch.allclose(terms["loss"], ((out - batch.targets.images) ** 2).mean(), atol=1e-6)
    loss0 = float(terms["loss"])
    _steps(model, batch, 20)
    assert _loss(model, batch) < 0.8 * loss0


def _fit(model: BoostModule, cache: Path, root: Path, steps: int = 3) -> None:
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(root))
    trainer.fit(model, datamodule=_datamodule(cache))


def test_adapter_file_written_at_fit_end_round_trips_into_a_fresh_base(batch, cache, tmp_path):
    model = _boost()
    _fit(model, cache, tmp_path)
    path = tmp_path / "adapters.safetensors"
    assert path.is_file()
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    targets = {f"generator.blocks.{i}.attn.{p}" for i in range(LAYERS) for p in ATTN}
    assert keys == {f"{t}.lora_{ab}.weight" for t in targets for ab in "AB"}  # adapters only, no base weight
    assert meta["r"] == "4" and float(meta["alpha"]) == 8.0
    boosted = _render(model, batch)
    assert not torch.equal(boosted, _render(_gtr(), batch))

    fresh = _gtr()  # same base weights (same seed), no BoostModule
    load_lora(add_lora(fresh.net, read_lora_config(path)), path)
    assert torch.equal(_render(fresh, batch), boosted)
    again = BoostModule(_gtr(), rank=4, alpha=8.0, adapters=str(path))
    assert torch.equal(_render(again, batch), boosted)


def test_merge_equals_unmerged(batch):
    model = _boost()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero adapters without training
        for layer in lora_layers(model.adapted).values():
            b = layer.lora_B["default"].weight
            b.copy_(0.05 * torch.randn(b.shape, generator=gen))
    unmerged = _render(model, batch)
    layer = lora_layers(model.adapted)["generator.blocks.0.attn.to_q"]
    w, a, b = (t.detach().double().clone() for t in (layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight))
    model.merge_adapters()
    assert not lora_layers(model.base) and model.merged
    assert model.base.state_dict().keys() == _gtr().state_dict().keys()  # a plain GTR again
    merged_w = model.base.net.generator.blocks[0].attn.to_q.weight.double()
    assert torch.allclose(merged_w, w + (8.0 / 4) * b @ a, atol=1e-6)  # W + alpha/r B A
    merged = _render(model, batch)
    assert torch.allclose(merged, unmerged, atol=1e-5), (merged - unmerged).abs().max()
    assert not torch.equal(merged, _render(_gtr(), batch))
    with pytest.raises(ConfigError, match="merged"):
        model.save_adapters("x.safetensors")


def test_merge_at_inference_merges_at_test_and_predict_start():
    model = _boost(merge_at_inference=True)
    model.on_predict_start()
    assert model.merged and not lora_layers(model.base)


def test_pattern_that_matches_nothing_lists_existing_modules():
    with pytest.raises(ConfigError) as e:
        _boost(pattern=r"generator\.blocks\.\d+\.attn\.to_qkv", submodule="net")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert msg.startswith("model.pattern") and "generator.blocks.<i>.attn.to_q" in msg and "GTRModule.net" in msg


def test_bad_options_are_one_line():
    with pytest.raises(ConfigError, match=r"^model\.rank"):
        _boost(rank=0)
    with pytest.raises(ConfigError, match=r"^model\.submodule.*children"):
        _boost(submodule="no_such_part")
    with pytest.raises(ConfigError, match=r"^model\.objective"):
        _boost(objective="velocity")
    with pytest.raises(ConfigError, match=r"^model\.base"):
        BoostModule(torch.nn.Linear(2, 2))


def test_base_checkpoint_loads_and_a_missing_one_is_one_line(tmp_path):
    from safetensors.torch import save_file

    trained = _gtr(seed=3)
    path = tmp_path / "gtr.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    model = _boost(base=_gtr(seed=0), base_checkpoint=str(path))
    got = {k.replace(".base_layer.", "."): v for k, v in model.base_state_dict().items()}
    want = trained.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(CheckpointError, match=r"^model\.base_checkpoint .*missing\.ckpt: file not found"):
        _boost(base_checkpoint=str(tmp_path / "missing.ckpt"))


@pytest.mark.slow  # ~6 s: the CLI's first parse (test_configs.py parses every YAML in the default suite)
def test_cpu_config_builds_the_boosted_gtr():
    from recon3d.cli import run_lightning_cli

    cli = run_lightning_cli(["-c", str(ROOT / "configs/mvboost_gtr_cpu.yaml"), "--trainer.logger", "false"], run=False)
    model = cli.model
    assert isinstance(model, BoostModule) and isinstance(model.base, GTRModule)
    assert model.lora_config.r == 8 and model.submodule == "net"
    assert set(lora_layers(model.adapted)) == {f"generator.blocks.{i}.attn.{p}" for i in range(3) for p in ATTN}
    assert model.hparams["base"]["class_path"] == "recon3d.methods.gtr.GTRModule"  # saved as config, not pickled


@pytest.mark.slow
def test_export_merges_the_adapters_and_takes_the_format_option(cache, tmp_path, caplog):
    """``recon3d export`` of a boosted checkpoint with ``merge_at_inference`` (a run-time option)
    and ``--format``, which BoostModule answers with its base's representation (meshes)."""
    from plyfile import PlyData

    from recon3d.cli import main, run_lightning_cli
    from recon3d.models.gtr.mesh import density_grid

    cfg = ["-c", str(ROOT / "configs/mvboost_gtr_cpu.yaml"), "-c", str(ROOT / "configs/mvboost_gtr/reliability.yaml"),
           "--data.dataset.init_args.cache_dir", str(cache)]
    cli = run_lightning_cli(cfg + ["--trainer.logger", "false"], run=False)
    model = cli.model
    with torch.no_grad():
        for layer in lora_layers(model.adapted).values():
            layer.lora_B["default"].weight.normal_(0, 0.05)
    cli.datamodule.prepare_data()
    batch = next(iter(cli.datamodule.predict_dataloader()))
    with torch.no_grad():  # a level at which this random model has a surface
        level = float(density_grid(model.base.field, model.base.triplanes(batch.inputs)[:1], 24).median())
    ckpt = tmp_path / "boost.ckpt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    out = tmp_path / "out"
    caplog.set_level("INFO", logger="recon3d.methods.boost")
    code = main(["export", *cfg[:4], "--ckpt", str(ckpt), "--out", str(out), "--format", "ply", "--",
                 "--data.dataset.init_args.cache_dir", str(cache), "--model.init_args.merge_at_inference", "true",
                 "--model.init_args.base.init_args.mesh_density_level", str(level),
                 "--model.init_args.base.init_args.export_resolution", "24"])
    assert code == 0
    assert any("merged the LoRA adapters into GTRModule" in r.getMessage() for r in caplog.records)
    plys = list(out.rglob("*.ply"))
    assert plys and not list(out.rglob("*.glb"))
    assert PlyData.read(str(plys[0]))["vertex"].count > 0


def test_adapters_inside_a_frozen_pretrained_part_are_refused(tmp_path):
    from recon3d.utils.checkpoint import mark_frozen

    base = _gtr()
    mark_frozen(base.net.generator, tmp_path / "generator.safetensors")  # checkpoints would leave it out
    with pytest.raises(ConfigError, match=r"^model\.pattern: net\.generator\.blocks\.0\.attn\.to_q lies in .*'net\.generator'"):
        _boost(base)


def test_official_gtr_weights_load_through_the_gtr_importer(tmp_path):
    """A file in the released GTR layout (``ckpt["pipeline"]``, official key names, built here
    from a network with the inverse of the importer's key table) lands in the base's network."""
    from recon3d.models.gtr import official_key_table

    trained = _gtr(seed=5)
    sd = trained.net.state_dict()
    pipeline = {"generator": {}, "field": {}}
    for (part, key), ours in official_key_table(trained.net).items():
        pipeline[part][key] = sd[ours].clone()
    path = tmp_path / "ckpt.pth"
    torch.save({"pipeline": pipeline}, path)
    model = _boost(official_weights=str(path))
    got = {k.replace(".base_layer.", "."): v for k, v in model.adapted.state_dict().items() if ".lora_" not in k}
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    with pytest.raises(ConfigError, match=r"^model\.official_weights: give the base's weights once"):
        _boost(official_weights=str(path), base_checkpoint=str(path))
    with pytest.raises(CheckpointError, match=r"^model\.official_weights .*nope\.pth: file not found"):
        _boost(official_weights=str(tmp_path / "nope.pth"))
