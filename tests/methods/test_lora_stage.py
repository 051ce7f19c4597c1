"""LoRAStageMixin (methods/_lora_stage.py) on a two-layer toy network, independent of the methods
that use it: install (only the adapters train), the checkpoint key layout the modules wrote before
the mixin existed loads strictly, the adapter file round-trips, merging is ``W + alpha/r B A``
computed here in float64, and every use after merging is one ConfigError line; the shared option
checks (``check_adamw_options``, ``check_adapter_file``)."""

from __future__ import annotations

import pytest
import torch

from recon3d.errors import ConfigError
from recon3d.methods._lora_stage import LoRAStageMixin, check_adapter_file
from recon3d.methods.base import ReconModule
from recon3d.utils.checks import check_adamw_options


class _Stage(LoRAStageMixin, ReconModule):
    LORA_WEIGHTS = "toy"

    def __init__(self, adapters: str | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2)).double()
        self.lr, self.weight_decay, self.betas, self.warmup_steps = 1e-2, 0.0, (0.9, 0.999), 0
        self.adapter_file, self.merge_at_inference = None, True
        from recon3d.adapters import LoRAConfig

        self._install_lora(LoRAConfig(target_modules=["0"], r=2, alpha=4.0), "toy", adapters)

    @property
    def lora_owner(self) -> torch.nn.Module:
        return self.net

    def training_losses(self, batch):
        self._check_trainable()
        return {"loss": self.net(batch).square().mean()}

    def reconstruct(self, batch):
        raise NotImplementedError


def _nonzero_b(stage: _Stage) -> None:
    with torch.no_grad():
        stage.net[0].lora_B["default"].weight.copy_(torch.arange(10, dtype=torch.float64).reshape(5, 2) / 10)


def test_only_the_adapters_train_and_the_frozen_weights_stay_bit_identical():
    stage = _Stage()
    assert sorted(n for n, p in stage.named_parameters() if p.requires_grad) == [
        "net.0.lora_A.default.weight", "net.0.lora_B.default.weight"]
    before = {k: v.clone() for k, v in stage.base_state_dict().items()}
    opt = stage.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["lr"] == 1e-2
    x = torch.randn(4, 3, dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad()
        stage.training_losses(x)["loss"].backward()
        opt.step()
    assert before.keys() == stage.base_state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in stage.base_state_dict().items())
    assert stage.net[0].lora_B["default"].weight.abs().sum() > 0


def test_checkpoint_key_layout_of_before_the_mixin_loads_strictly():
    """The Lightning checkpoint format: the owner's attribute, peft's keys on adapted layers
    (``base_layer``, ``lora_A.default``, ``lora_B.default``), the network's own elsewhere.
    A state dict written in that layout by hand loads strictly and lands in the right tensors."""
    stage = _Stage()
    g = torch.Generator().manual_seed(3)
    old = {
        "net.0.base_layer.weight": torch.randn(5, 3, generator=g, dtype=torch.float64),
        "net.0.base_layer.bias": torch.randn(5, generator=g, dtype=torch.float64),
        "net.0.lora_A.default.weight": torch.randn(2, 3, generator=g, dtype=torch.float64),
        "net.0.lora_B.default.weight": torch.randn(5, 2, generator=g, dtype=torch.float64),
        "net.1.weight": torch.randn(2, 5, generator=g, dtype=torch.float64),
        "net.1.bias": torch.randn(2, generator=g, dtype=torch.float64),
    }
    assert set(stage.state_dict()) == set(old)
    stage.load_state_dict(old, strict=True)
    assert torch.equal(stage.net[0].base_layer.weight, old["net.0.base_layer.weight"])
    assert torch.equal(stage.adapter_state_dict()["0.lora_B.weight"], old["net.0.lora_B.default.weight"])


def test_adapter_file_round_trips_and_merge_is_w_plus_alpha_over_r_ba(tmp_path):
    stage = _Stage()
    _nonzero_b(stage)
    path = stage.save_adapters(tmp_path / "a.safetensors")
    fresh = _Stage(adapters=str(path))
    assert set(fresh.adapter_state_dict()) == {"0.lora_A.weight", "0.lora_B.weight"}
    assert all(torch.equal(fresh.adapter_state_dict()[k], v) for k, v in stage.adapter_state_dict().items())
    x = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        adapted = stage.net(x)
        w, b = stage.net[0].base_layer.weight.clone(), stage.net[0].base_layer.bias.clone()
        a, bb = stage.net[0].lora_A["default"].weight.clone(), stage.net[0].lora_B["default"].weight.clone()
    stage.on_predict_start()  # merge_at_inference
    assert stage.merged and type(stage.net[0]) is torch.nn.Linear
    torch.testing.assert_close(stage.net[0].weight, w + (4.0 / 2) * bb @ a, rtol=0, atol=1e-12)
    assert torch.equal(stage.net[0].bias, b)
    torch.testing.assert_close(stage.net(x), adapted, rtol=0, atol=1e-12)
    assert stage.merge_adapters() is stage.net  # a second merge is a no-op returning the owner
    for call in (stage.adapter_state_dict, lambda: stage.save_adapters(tmp_path / "b.safetensors")):
        with pytest.raises(ConfigError, match=r"merged into the toy weights \(merge_adapters\); there are none left"):
            call()
    with pytest.raises(ConfigError, match=r"^training: the adapters were merged into the toy weights"):
        stage.training_losses(x)
    with pytest.raises(ConfigError, match=r"^_Stage: no trainable adapter weights"):
        stage.configure_optimizers()


def test_a_pattern_that_matches_nothing_names_the_option_and_the_part():
    class Bad(_Stage):
        def _install_lora(self, config, where, adapters=None, check=None):
            from recon3d.adapters import LoRAConfig

            super()._install_lora(LoRAConfig(target_modules=r"nope\.\d+", r=2, alpha=4.0), "ToyNet", adapters, check)

    with pytest.raises(ConfigError, match=r"^model\.pattern \(module names in ToyNet\):"):
        Bad()


@pytest.mark.parametrize("kw, key", [
    ({"lr": 0.0}, "model.lr"), ({"lr": float("nan")}, "model.lr"), ({"weight_decay": -1.0}, "model.weight_decay"),
    ({"betas": (0.9, 1.0)}, r"model.betas\[1\]"), ({"betas": (-0.1, 0.9)}, r"model.betas\[0\]"),
    ({"warmup_steps": 1.5}, "model.warmup_steps"), ({"warmup_steps": -1}, "model.warmup_steps"),
])
def test_adamw_options_name_the_first_bad_key(kw, key):
    args = {"lr": 1e-4, "weight_decay": 0.0, "betas": (0.9, 0.999), "warmup_steps": 0, **kw}
    with pytest.raises(ConfigError, match=rf"^{key}: expected"):
        check_adamw_options(**args)


def test_adamw_options_accept_good_values_and_no_warmup():
    check_adamw_options(1e-4, 0.05, (0.0, 0.95), 10)
    check_adamw_options(1e-4, 0.0, [0.9, 0.999])  # a method without warm-up


@pytest.mark.parametrize("name", ["a.pt", "run/a.safetensors", "../a.safetensors"])
def test_adapter_file_must_be_a_bare_safetensors_name(name):
    with pytest.raises(ConfigError, match=r"^model\.adapter_file: expected a file name ending in \.safetensors"):
        check_adapter_file(name)
    check_adapter_file("adapters.safetensors")
    check_adapter_file(None)
