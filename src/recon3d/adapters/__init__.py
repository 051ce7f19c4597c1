"""Parameter-efficient adapters for any ``nn.Module`` (LoRA over peft); see :mod:`recon3d.adapters.lora`.

Layering: beside ``models/`` — may import ``models``, ``render``, ``representations``, ``data``;
methods import it, never the reverse. Importing this package does not import peft.
"""

from recon3d.adapters.lora import (
    LORA_LAYER_TYPES,
    LoadResult,
    LoRAConfig,
    add_lora,
    find_lora_targets,
    load_lora,
    lora_disabled,
    lora_layers,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    read_lora_config,
    save_lora,
    set_lora_enabled,
    unmerge_lora,
)

__all__ = [
    "LORA_LAYER_TYPES",
    "LoadResult",
    "LoRAConfig",
    "add_lora",
    "find_lora_targets",
    "load_lora",
    "lora_disabled",
    "lora_layers",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_lora",
    "read_lora_config",
    "save_lora",
    "set_lora_enabled",
    "unmerge_lora",
]
