"""LoRA: the layer (`layer`), which layers get it and its injection (`targets`), and adapter
files in PEFT's format (`adapters`).

Everything public is importable from here (`from lora_lightning.lora import LoRALinear,
inject_lora, save_adapter, load_adapter`), the contract outside tools rely on.
"""

from lora_lightning.lora.adapters import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    check_adapter_folder,
    load_adapter,
    peft_state_dict,
    save_adapter,
)
from lora_lightning.lora.layer import (
    LoRALinear,
    count_parameters,
    lora_disabled,
    lora_modules,
    lora_state_dict,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from lora_lightning.lora.targets import inject_lora

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "LoRALinear",
    "check_adapter_folder",
    "count_parameters",
    "inject_lora",
    "load_adapter",
    "lora_disabled",
    "lora_modules",
    "lora_state_dict",
    "merge_lora",
    "peft_state_dict",
    "save_adapter",
    "unload_lora",
    "unmerge_lora",
]
