"""Parameter-efficient fine-tuning for PyTorch Lightning: LoRA and friends over any base layer."""

from typing import TYPE_CHECKING, Any

from lightning_peft.adapters import (
    IA3,
    BitFit,
    BottleneckAdapter,
    LoRA,
    LoRALinear,
    PrefixTuning,
    PromptTuning,
    Unfreeze,
    fold_prefix_,
)
from lightning_peft.checkpoint import adapter_state_dict, load_adapter_state_dict
from lightning_peft.checkpoint.export import merge_and_export
from lightning_peft.checkpoint.peft_format import load_peft, save_peft
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
from lightning_peft.quantization.estimate import estimate_memory
from lightning_peft.switching import (
    adapter_names,
    delete_adapter,
    disable_adapters,
    mixed_batch,
    set_active_adapters,
)
from lightning_peft.tfew import tfew_losses

__version__ = "0.1.0"

if TYPE_CHECKING:
    from lightning_peft.lightning import (
        AdapterCheckpoint,
        AdapterModelParallelStrategy,
        Distillation,
        PeftCallback,
        PeftMixin,
        PeftModelSummary,
        PeftPrecision,
        Trainer,
    )
    from lightning_peft.tfew_metric import RankClassificationAccuracy

# Lightning takes seconds to import; plain-PyTorch users of apply_adapters never pay for it.
_LIGHTNING_NAMES = (
    "AdapterModelParallelStrategy",
    "AdapterCheckpoint",
    "Distillation",
    "PeftCallback",
    "PeftMixin",
    "PeftModelSummary",
    "PeftPrecision",
    "Trainer",
)


def __getattr__(name: str) -> Any:
    if name == "RankClassificationAccuracy":  # torchmetrics, imported on first use
        from lightning_peft.tfew_metric import RankClassificationAccuracy

        return RankClassificationAccuracy
    if name in _LIGHTNING_NAMES:
        import lightning_peft.lightning

        return getattr(lightning_peft.lightning, name)
    raise AttributeError(f"module 'lightning_peft' has no attribute {name!r}")


__all__ = [
    "IA3",
    "AdapterCheckpoint",
    "AdapterConfigError",
    "AdapterModelParallelStrategy",
    "AdapterStateError",
    "AdapterStateKeyError",
    "BitFit",
    "BottleneckAdapter",
    "Distillation",
    "LoRA",
    "LoRALinear",
    "MergeReport",
    "ParameterCount",
    "PeftCallback",
    "PeftMixin",
    "PeftModelSummary",
    "PeftPrecision",
    "PrefixTuning",
    "PromptTuning",
    "RankClassificationAccuracy",
    "TargetModulesError",
    "Trainer",
    "Unfreeze",
    "UnsupportedLayerError",
    "adapter_names",
    "adapter_parameter_names",
    "adapter_state_dict",
    "apply_adapters",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "estimate_memory",
    "fold_prefix_",
    "load_adapter_state_dict",
    "load_peft",
    "merge_adapters",
    "merge_and_export",
    "mixed_batch",
    "save_peft",
    "set_active_adapters",
    "tfew_losses",
    "unmerge_adapters",
]
