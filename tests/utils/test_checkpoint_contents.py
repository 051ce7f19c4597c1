"""What a ReconModule checkpoint holds (issue 14, item 5): hyper-parameters that recon3d's
weights-only loader accepts without a hand-kept ignore list, and frozen pretrained parts left
out and re-attached from their source file.

Checkpoints are written by a real ``lightning.Trainer`` fit on a tiny synthetic dataset and read
back with recon3d's loaders. References: the negative control (the same model under plain
Lightning produces a file the loader refuses), the source tensors written to the safetensors
file, and the trained module's own outputs (compared with ``torch.equal``).
"""

from __future__ import annotations

import logging
import shutil

import lightning as L
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from recon3d.data.batch import Batch
from recon3d.data.datamodule import ReconDataModule
from recon3d.data.synthetic import SyntheticDataset
from recon3d.errors import CheckpointError
from recon3d.methods.base import NonFiniteGuard, ReconModule
from recon3d.utils.checkpoint import FROZEN_KEY, load_frozen, load_state_dict_file, load_weights_into


class ColourNet(nn.Module):
    """A sub-model passed to a method as an object (built in Python, not from a config)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.width = width
        self.body = nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Linear(width, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _pooled(batch: Batch) -> torch.Tensor:
    """``(B, 3)`` mean colour of the input views."""
    return batch.inputs.images.mean(dim=(1, 3, 4))


class NewMethod(ReconModule):
    """A new method written the obvious way: a bare ``save_hyperparameters()`` and a module argument."""

    def __init__(self, net: nn.Module, lr: float = 1e-2, note: str = "x", evaluation=None, nonfinite: NonFiniteGuard | None = None):
        super().__init__(evaluation=evaluation, nonfinite=nonfinite)
        self.save_hyperparameters()
        self.net, self.lr = net, lr

    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        target = batch.targets.images.mean(dim=(1, 3, 4))
        loss = F.mse_loss(self.net(_pooled(batch)), target)
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class PlainLightning(L.LightningModule):
    """The negative control: the same thing on Lightning's own ``save_hyperparameters``."""

    def __init__(self, net: nn.Module, lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        self.net, self.lr = net, lr

    def training_step(self, batch: Batch, batch_idx: int):
        return F.mse_loss(self.net(_pooled(batch)), batch.targets.images.mean(dim=(1, 3, 4)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class FrozenBackboneMethod(ReconModule):
    """A trainable head on a frozen backbone loaded from a local safetensors file."""

    def __init__(self, backbone_path: str | None = None, width: int = 128):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        if backbone_path is not None:
            load_frozen(self.backbone, backbone_path)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"loss": F.mse_loss(self(_pooled(batch)), batch.targets.images.mean(dim=(1, 3, 4)))}

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory):
    ds = SyntheticDataset(num_objects=3, views_per_object=3, resolution=8, num_surface_points=8, num_sdf_points=8,
                          mesh_resolution=0, cache_dir=str(tmp_path_factory.mktemp("tiny")))
    return ReconDataModule(ds, num_val_objects=0, num_test_objects=0, num_input_views=1, num_target_views=1,
                           batch_size=2, with_geometry=False)


def _fit_and_save(model: L.LightningModule, dm, path) -> None:
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(path.parent))
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(path)


# ---------------------------------------------------------------------- hyper-parameters
def test_bare_save_hyperparameters_gives_a_weights_only_checkpoint(tmp_path, datamodule):
    torch.manual_seed(0)
    control = tmp_path / "plain.ckpt"
    _fit_and_save(PlainLightning(ColourNet()), datamodule, control)
    with pytest.raises(CheckpointError, match="refused to load"):  # the defect this guards against
        load_state_dict_file(control)

    torch.manual_seed(0)
    model = NewMethod(ColourNet(width=8), lr=0.05, note="kept", nonfinite=NonFiniteGuard("halt", 3))
    path = tmp_path / "new.ckpt"
    _fit_and_save(model, datamodule, path)
    ckpt = load_state_dict_file(path)  # weights-only
    hp = ckpt["hyper_parameters"]
    assert hp["lr"] == 0.05 and hp["note"] == "kept" and hp["evaluation"] is None
    assert hp["nonfinite"] == {"policy": "halt", "max_consecutive": 3}  # a dataclass as its fields
    assert "net" not in hp
    reason = ckpt["hyper_parameters_omitted"]["net"]
    assert "ColourNet nn.Module built in Python" in reason and "class_path + init_args" in reason and "\n" not in reason
    assert dict(model.hparams) == {k: v for k, v in hp.items()}  # hparams.yaml and the checkpoint agree

    # the weights reload exactly into a fresh instance (different initial weights)
    torch.manual_seed(1)
    fresh = NewMethod(ColourNet(width=8))
    assert load_weights_into(fresh, path) == []
    x = torch.rand(5, 3)
    assert torch.equal(fresh.net(x), model.net(x))
    # and through Lightning's own loader, weights-only
    again = NewMethod.load_from_checkpoint(path, net=ColourNet(width=8), weights_only=True)
    assert torch.equal(again.net(x), model.net(x)) and again.lr == 0.05
    assert again.nonfinite == NonFiniteGuard("halt", 3)


def test_module_given_as_config_is_saved_as_its_config(tmp_path, datamodule, monkeypatch):
    """Through LightningCLI (what ``recon3d fit`` runs) a module argument is its class_path +
    init_args, and a checkpoint re-creates the method from it."""
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["recon3d"])  # the CLI reads only ``args``
    net_cfg = {"class_path": f"{__name__}.ColourNet", "init_args": {"width": 6}}
    cli = LightningCLI(ReconModule, ReconDataModule, subclass_mode_model=True, run=False, save_config_callback=None, args={
        "model": {"class_path": f"{__name__}.NewMethod", "init_args": {"net": net_cfg, "lr": 0.02}},
        "data": {"dataset": {"class_path": "recon3d.data.synthetic.SyntheticDataset", "init_args": {
            "num_objects": 3, "views_per_object": 3, "resolution": 8, "num_surface_points": 8, "num_sdf_points": 8,
            "mesh_resolution": 0, "cache_dir": str(datamodule.dataset.cache_dir)}},
            "num_val_objects": 0, "num_test_objects": 0, "num_input_views": 1, "num_target_views": 1, "with_geometry": False},
        "trainer": {"accelerator": "cpu", "logger": False, "max_steps": 1},
    })
    path = tmp_path / "cli.ckpt"
    _fit_and_save(cli.model, cli.datamodule, path)
    ckpt = load_state_dict_file(path)
    hp = ckpt["hyper_parameters"]
    assert hp["net"] == net_cfg and hp["lr"] == 0.02 and hp["_class_path"] == f"{__name__}.NewMethod"
    assert "hyper_parameters_omitted" not in ckpt
    rebuilt = NewMethod.load_from_checkpoint(path, weights_only=True)  # the net is built from its config
    assert isinstance(rebuilt.net, ColourNet) and rebuilt.net.width == 6
    x = torch.rand(4, 3)
    assert torch.equal(rebuilt.net(x), cli.model.net(x))


# ---------------------------------------------------------------------- frozen pretrained parts
@pytest.fixture
def backbone_file(tmp_path):
    torch.manual_seed(7)
    src = FrozenBackboneMethod().backbone
    tensors = {k: v.detach().clone().contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / "pretrained" / "backbone.safetensors"
    path.parent.mkdir()
    save_file(tensors, str(path))
    return path, tensors


def test_frozen_part_is_left_out_and_reattached(tmp_path, datamodule, backbone_file):
    src_path, src_tensors = backbone_file
    torch.manual_seed(0)
    model = FrozenBackboneMethod(str(src_path))
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in src_tensors.items())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    slim = tmp_path / "slim.ckpt"
    _fit_and_save(model, datamodule, slim)

    full_model = FrozenBackboneMethod(None)  # the same, frozen by hand but not marked: all of it is saved
    full_model.backbone.requires_grad_(False)
    full = tmp_path / "full.ckpt"
    _fit_and_save(full_model, datamodule, full)

    backbone_bytes = sum(v.numel() * v.element_size() for v in src_tensors.values())
    ckpt = load_state_dict_file(slim)
    assert not any(k.startswith("backbone.") for k in ckpt["state_dict"])
    rec = ckpt[FROZEN_KEY]["backbone"]
    assert rec["source"] == str(src_path.resolve()) and set(rec["tensors"]) == set(src_tensors)
    assert all(rec["tensors"][k]["shape"] == list(v.shape) for k, v in src_tensors.items())
    assert slim.stat().st_size < full.stat().st_size - 0.9 * backbone_bytes

    x = torch.rand(6, 3)
    want = model(x)
    torch.manual_seed(3)
    fresh = FrozenBackboneMethod(None)  # random backbone: the tensors must come from the source file
    assert not torch.equal(fresh(x), want)
    assert load_weights_into(fresh, slim) == []
    assert torch.equal(fresh(x), want)
    # Lightning's path: on_load_checkpoint re-attaches before load_state_dict
    again = FrozenBackboneMethod.load_from_checkpoint(slim, backbone_path=None, weights_only=True)
    assert torch.equal(again(x), want)


def test_a_frozen_tensor_that_moved_stays_in_the_checkpoint(tmp_path, datamodule, backbone_file, caplog):
    src_path, _ = backbone_file
    torch.manual_seed(0)
    model = FrozenBackboneMethod(str(src_path))
    with torch.no_grad():
        model.backbone[2].bias.add_(1.0)  # e.g. statistics updated in train mode: not the source any more
    path = tmp_path / "moved.ckpt"
    with caplog.at_level(logging.WARNING, logger="recon3d.utils.checkpoint"):
        _fit_and_save(model, datamodule, path)
    assert "1 tensors are not in" in caplog.text
    ckpt = load_state_dict_file(path)
    assert [k for k in ckpt["state_dict"] if k.startswith("backbone.")] == ["backbone.2.bias"]
    fresh = FrozenBackboneMethod(None)
    load_weights_into(fresh, path)
    x = torch.rand(4, 3)
    assert torch.equal(fresh(x), model(x))


def test_missing_or_changed_source_is_one_line_naming_the_file(tmp_path, datamodule, backbone_file):
    src_path, src_tensors = backbone_file
    torch.manual_seed(0)
    model = FrozenBackboneMethod(str(src_path))
    path = tmp_path / "slim.ckpt"
    _fit_and_save(model, datamodule, path)
    fresh = FrozenBackboneMethod(None)

    built = FrozenBackboneMethod(str(src_path))  # built from the source before it moved
    moved = tmp_path / "elsewhere.safetensors"
    shutil.move(src_path, moved)
    # a model that already holds exactly the recorded tensors needs no file
    load_weights_into(built, path)
    x = torch.rand(3, 3)
    assert torch.equal(built(x), model(x))
    for load in (lambda: load_weights_into(fresh, path),
                 lambda: FrozenBackboneMethod.load_from_checkpoint(path, backbone_path=None, weights_only=True)):
        with pytest.raises(CheckpointError) as e:
            load()
        msg = str(e.value)
        assert "\n" not in msg and str(src_path.resolve()) in msg and "does not exist" in msg and "'backbone'" in msg

    other = dict(src_tensors)
    other["0.weight"] = other["0.weight"] + 1e-3
    del other["2.bias"]
    save_file(other, str(src_path))
    with pytest.raises(CheckpointError) as e:
        load_weights_into(fresh, path)
    msg = str(e.value)
    assert "\n" not in msg and str(src_path.resolve()) in msg
    assert "1 missing (e.g. ['2.bias'])" in msg and "1 with other values (e.g. ['0.weight'])" in msg


def test_lpips_weights_are_frozen_parts(tmp_path):
    """LPIPS's backbone and heads come from local files: checkpoints leave them out."""
    from recon3d.metrics.lpips import BACKBONE_FILES, AlexNetFeatures, LPIPSNet
    from recon3d.utils.checkpoint import attach_frozen_parts, frozen_parts_of, strip_frozen_parts

    torch.manual_seed(0)
    tv = {k: v.clone() for k, v in AlexNetFeatures().state_dict().items()}
    tv["classifier.1.weight"] = torch.randn(8, 4)  # torchvision files hold more than the trunk
    torch.save(tv, tmp_path / BACKBONE_FILES["alex"])
    holder = nn.Module()
    holder.lpips = LPIPSNet("alex", pretrained=True, weights_dir=tmp_path)
    parts = frozen_parts_of(holder)
    assert set(parts) == {"lpips.trunk", "lpips.lins"}
    assert parts["lpips.trunk"].path == str((tmp_path / BACKBONE_FILES["alex"]).resolve())
    full = holder.state_dict()
    ckpt = {"state_dict": dict(full)}
    strip_frozen_parts(ckpt, parts)
    assert ckpt["state_dict"] == {}
    (tmp_path / BACKBONE_FILES["alex"]).unlink()
    with pytest.raises(CheckpointError, match=r"frozen part 'lpips.trunk' .*alexnet.*does not exist"):
        attach_frozen_parts(dict(ckpt, state_dict={}), where="gtr.ckpt")
    attach_frozen_parts(ckpt, module=holder)  # the network on this machine holds the same tensors
    assert set(ckpt["state_dict"]) == set(full) and all(torch.equal(ckpt["state_dict"][k], v) for k, v in full.items())


def test_safe_hparams_values_load_weights_only(tmp_path):
    """Every kind of value an init arg may take comes out as plain data torch's own
    weights-only unpickler accepts; objects are omitted with the reason."""
    import enum
    from collections import namedtuple
    from pathlib import Path

    import numpy as np

    from recon3d.utils.hparams import safe_hparams

    class Mode(enum.Enum):
        FAST = "fast"

    Pair = namedtuple("Pair", "a b")
    hp = {"path": Path("/data/x"), "mode": Mode.FAST, "n": np.int64(3), "f": np.float64(0.5), "arr": np.arange(3),
          "betas": (0.9, 0.99), "pair": Pair(1, 2), "cls": nn.Linear, "tags": {"b", "a"}, "dtype": torch.float16,
          "guard": NonFiniteGuard("skip", 2), "cfg": {"class_path": "x.Y", "init_args": {"k": [1, 2]}},
          "net": ColourNet(), "nested": [1, {"m": ColourNet()}], "t": torch.ones(2)}
    kept, omitted = safe_hparams(hp)
    assert set(omitted) == {"net", "nested"} and "nested[1].m" in omitted["nested"]
    torch.save(kept, tmp_path / "hp.pt")
    back = torch.load(tmp_path / "hp.pt", weights_only=True)  # torch's own weights-only loader
    assert back["path"] == "/data/x" and back["mode"] == "fast" and back["n"] == 3 and type(back["n"]) is int
    assert type(back["f"]) is float and back["arr"] == [0, 1, 2] and back["betas"] == (0.9, 0.99)
    assert back["pair"] == {"a": 1, "b": 2} and back["cls"] == "torch.nn.modules.linear.Linear"
    assert back["tags"] == ["a", "b"] and back["dtype"] == "torch.float16"
    assert back["guard"] == {"policy": "skip", "max_consecutive": 2} and back["cfg"] == hp["cfg"]
    assert torch.equal(back["t"], hp["t"])
