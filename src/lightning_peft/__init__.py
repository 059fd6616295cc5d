"""Parameter-efficient fine-tuning for PyTorch Lightning: LoRA and friends over any base layer."""

from lightning_peft.adapters import LoRA, LoRALinear
from lightning_peft.checkpoint import adapter_state_dict, load_adapter_state_dict
from lightning_peft.counting import ParameterCount, count_parameters
from lightning_peft.errors import (
    AdapterConfigError,
    AdapterStateError,
    AdapterStateKeyError,
    TargetModulesError,
    UnsupportedLayerError,
)
from lightning_peft.injection import adapter_parameter_names, apply_adapters
from lightning_peft.merging import MergeReport, merge_adapters, unmerge_adapters

__version__ = "0.1.0"

__all__ = [
    "AdapterConfigError",
    "AdapterStateError",
    "AdapterStateKeyError",
    "LoRA",
    "LoRALinear",
    "MergeReport",
    "ParameterCount",
    "TargetModulesError",
    "UnsupportedLayerError",
    "adapter_parameter_names",
    "adapter_state_dict",
    "apply_adapters",
    "count_parameters",
    "load_adapter_state_dict",
    "merge_adapters",
    "unmerge_adapters",
]
