"""The life cycle of a LoRA stage: adapters trained on a frozen network, shared by
:class:`~recon3d.methods.boost.BoostModule` (MVBoost's boosting of any base method) and
:class:`~recon3d.methods.vggt.VGGTModule` (ReconViaGen's VGGT fine-tuning).

:class:`LoRAStageMixin` holds what those modules do alike; each keeps what differs (which
network is frozen, where the adapters go and the default targets, the loss, extra checks such as
BoostModule's refusal of targets inside a frozen pretrained part, its BatchNorm handling). A
module using it names two parts:

- :attr:`~LoRAStageMixin.lora_owner`: the network whose every weight is frozen (BoostModule:
  ``self.base``, VGGTModule: ``self.net``), also what :meth:`merge_adapters` returns;
- :attr:`~LoRAStageMixin.adapted`: the sub-module that holds the adapters, and the root that the
  LoRA target names and the adapter file's keys are relative to (default: the owner;
  BoostModule: ``base.<submodule>``).

Life cycle, in this order:

1. ``__init__`` of the module: its options (:func:`check_adapter_file`,
   :func:`~recon3d.utils.checks.check_adamw_options`), ``save_hyperparameters``, the network and
   its pretrained weights -- loaded *before* the adapters exist, so the weight files' keys are
   the network's own;
2. :meth:`~LoRAStageMixin._install_lora`: :func:`~recon3d.adapters.add_lora` on :attr:`adapted`
   (a target pattern that matches nothing is one ConfigError line naming ``model.pattern``), the
   module's own check of the adapted layers, every parameter of :attr:`lora_owner` frozen, then
   only the adapters trainable (:func:`~recon3d.adapters.mark_only_lora_as_trainable`), then an
   adapter file loaded when ``adapters`` is given (strict: rank, alpha, targets, keys);
3. ``fit``: :meth:`configure_optimizers` is AdamW over the trainable (adapter) weights,
   :meth:`lr_factor` a linear warm-up then cosine decay to 0 at the last step; at the end of fit
   :meth:`on_train_end` writes the adapters alone to ``<run folder>/<adapter_file>`` (rank 0,
   atomic);
4. ``test`` / ``predict``: with ``merge_at_inference`` the adapters are merged first
   (:meth:`merge_adapters`: ``W <- W + alpha/r · B A``, peft wrappers removed, a plain network of
   the owner's class again). Irreversible: afterwards the adapter methods and training raise one
   ConfigError line saying so.

Checkpoint formats (this mixin adds no tensors, buffers or checkpoint hooks, so both are exactly
those the modules wrote before it existed):

- the Lightning checkpoint holds the whole module (frozen network + adapters) under the owner's
  attribute, with peft's keys for every adapted layer ``L`` (names inside :attr:`adapted`):
  ``L.base_layer.weight``, ``L.base_layer.bias``, ``L.lora_A.default.weight (r, in)``,
  ``L.lora_B.default.weight (out, r)``; other keys are the network's own. ``--ckpt_path``
  resume, ``test``, ``predict`` and ``export`` load it as any method's
  (:class:`~recon3d.methods.base.ReconModule`'s hooks);
- the adapter file (:func:`~recon3d.adapters.save_lora`) is safetensors with keys relative to
  :attr:`adapted` without peft's adapter name, ``L.lora_A.weight``, ``L.lora_B.weight``, and a
  header with ``r``, ``alpha``, ``dropout``, the target pattern and the target list, so
  :func:`~recon3d.adapters.read_lora_config` + :func:`~recon3d.adapters.load_lora` rebuild it in
  any fresh network built the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from recon3d.adapters import (
    LoRAConfig,
    add_lora,
    load_lora,
    lora_layers,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    save_lora,
)
from recon3d.errors import ConfigError
from recon3d.methods.base import warmup_cosine_factor

__all__ = ["LoRAStageMixin", "check_adapter_file"]


def check_adapter_file(adapter_file: str | None) -> None:
    """``model.adapter_file`` is None or a bare file name ending in ``.safetensors`` (it is
    written into the run folder); else one ConfigError line."""
    if adapter_file is not None and (not adapter_file.endswith(".safetensors") or Path(adapter_file).name != adapter_file):
        raise ConfigError(f"model.adapter_file: expected a file name ending in .safetensors (written into the run folder), "
                          f"got {adapter_file!r}")


class LoRAStageMixin:
    """Adapters on a frozen network: install, train, save, load, merge (module docstring).

    Put it before :class:`~recon3d.methods.base.ReconModule` in the bases
    (``class M(LoRAStageMixin, ReconModule)``). The module sets, in ``__init__``: the owner's
    attribute (see :attr:`lora_owner`), ``lr``, ``weight_decay``, ``betas``, ``warmup_steps``,
    ``adapter_file`` and ``merge_at_inference``; :meth:`_install_lora` sets ``lora_config`` and
    ``merged``.

    Class attributes:
        LORA_WEIGHTS: how messages name the frozen weights (``"base"``: "merged into the base
            weights").
        LORA_LOG_NAME: how the log line of the written adapter file names them (``"LoRA"``).
    """

    LORA_WEIGHTS: str = "base"
    LORA_LOG_NAME: str = "LoRA"

    lora_config: LoRAConfig
    merged: bool

    # ------------------------------------------------------------------ the two parts
    @property
    def lora_owner(self) -> torch.nn.Module:
        """The network whose every weight is frozen (the module's own attribute)."""
        raise NotImplementedError(f"{type(self).__name__}: a LoRA stage names its frozen network (lora_owner)")

    @property
    def adapted(self) -> torch.nn.Module:
        """The part that holds the adapters; their names are relative to it. Default: the owner."""
        return self.lora_owner

    # ------------------------------------------------------------------ installing
    def _install_lora(self, config: LoRAConfig, where: str, adapters: str | None = None,
                      check: Callable[[dict[str, torch.nn.Module]], None] | None = None) -> None:
        """Add the adapters of ``config`` to :attr:`adapted`, run ``check`` on the adapted layers
        (``{name: peft layer}``; it raises to refuse them), freeze :attr:`lora_owner`, make only
        the adapters trainable and load the adapter file ``adapters`` when given.

        ``where`` names the part in the message of a pattern that matches nothing
        (``"model.pattern (module names in <where>): ..."``)."""
        target = self.adapted
        try:
            add_lora(target, config)
        except ConfigError as e:  # name the option and the part the names are relative to
            raise ConfigError(str(e).replace("target_modules:", f"model.pattern (module names in {where}):", 1)) from None
        if check is not None:
            check(lora_layers(target))
        for p in self.lora_owner.parameters():
            p.requires_grad_(False)
        mark_only_lora_as_trainable(target)
        if adapters is not None:
            load_lora(target, adapters)
        self.lora_config = config
        self.merged = False

    # ------------------------------------------------------------------ adapters
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter tensors (``<layer>.lora_A.weight (r, in)``, ``<layer>.lora_B.weight (out, r)``),
        names relative to :attr:`adapted` -- the adapter file's keys."""
        self._check_not_merged("adapter_state_dict")
        return lora_state_dict(self.adapted)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of :attr:`lora_owner` except the adapters (peft's ``base_layer`` keys as
        they are): what training the adapters must leave bit-identical."""
        return {k: v for k, v in self.lora_owner.state_dict().items() if ".lora_A." not in k and ".lora_B." not in k}

    def save_adapters(self, path: str | Path) -> Path:
        """Write the adapters alone to ``path`` (``.safetensors``, atomic, with the LoRA header)."""
        self._check_not_merged("save_adapters")
        return save_lora(self.adapted, path)

    def load_adapters(self, path: str | Path) -> None:
        """Load an adapter file (strict: rank, alpha, targets and keys must match)."""
        self._check_not_merged("load_adapters")
        load_lora(self.adapted, path)

    def merge_adapters(self) -> torch.nn.Module:
        """Fold the adapters into the frozen weights (``W <- W + alpha/r · B A``) and remove them:
        :attr:`lora_owner` is a plain network of its own class again, computing the adapted
        outputs (up to float rounding). Irreversible for this module (save the adapters first);
        returns :attr:`lora_owner`."""
        if not self.merged:
            merge_lora(self.adapted, unload=True)
            self.merged = True
            self._lora_log.info("merged the LoRA adapters into %s's weights", type(self.lora_owner).__name__)
        return self.lora_owner

    @property
    def _lora_log(self) -> logging.Logger:
        # the using module's logger (recon3d.methods.boost, ...vggt): log settings keep applying per method
        return logging.getLogger(type(self).__module__)

    def _check_not_merged(self, what: str) -> None:
        if self.merged:
            raise ConfigError(f"{what}: the adapters were merged into the {self.LORA_WEIGHTS} weights (merge_adapters); there are none left")

    def _check_trainable(self) -> None:
        """Training after :meth:`merge_adapters` is one ConfigError line (nothing is left to train)."""
        if self.merged:
            raise ConfigError(f"training: the adapters were merged into the {self.LORA_WEIGHTS} weights; nothing is left to train")

    # ------------------------------------------------------------------ training
    def configure_optimizers(self):
        """AdamW (``lr``, ``weight_decay``, ``betas``) over the trainable weights: the adapters."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"{type(self).__name__}: no trainable adapter weights (were the adapters merged?)")
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)

    def lr_factor(self, step: int) -> float:
        """Linear warm-up for ``warmup_steps``, then cosine decay to 0 at the last step."""
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        return warmup_cosine_factor(step, total, self.warmup_steps)

    def on_train_end(self) -> None:
        """Write the adapter-only file into the run folder (rank 0; atomic)."""
        if self.adapter_file is None or self.merged or not self.trainer.is_global_zero:
            return
        path = self.save_adapters(self._out_dir() / self.adapter_file)
        self._lora_log.info("wrote the %s adapters (%d layers, r=%d) to %s", self.LORA_LOG_NAME, len(lora_layers(self.adapted)),
                 self.lora_config.r, path)

    # ------------------------------------------------------------------ inference
    def on_test_start(self) -> None:
        """``merge_at_inference``: merge the adapters before the test loop."""
        if self.merge_at_inference:
            self.merge_adapters()

    on_predict_start = on_test_start
