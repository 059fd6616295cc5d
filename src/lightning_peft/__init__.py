"""Parameter-efficient fine-tuning for PyTorch Lightning: LoRA and friends over any base layer."""

from typing import TYPE_CHECKING, Any

from lightning_peft.adapters import (
    IA3,
    BitFit,
    BottleneckAdapter,
    LoRA,
    PrefixTuning,
    PromptTuning,
    Unfreeze,
)
from lightning_peft.checkpoint import adapter_state_dict, load_adapter_state_dict
from lightning_peft.checkpoint.export import merge_and_export
from lightning_peft.checkpoint.peft_format import load_peft, save_peft
from lightning_peft.counting import count_parameters
from lightning_peft.errors import AdapterConfigError, AdapterStateError
from lightning_peft.injection import apply_adapters
from lightning_peft.merging import merge_adapters, unmerge_adapters
from lightning_peft.switching import (
    adapter_names,
    delete_adapter,
    disable_adapters,
    mixed_batch,
    set_active_adapters,
)

__version__ = "0.1.0"

if TYPE_CHECKING:
    from lightning_peft.lightning import (
        AdapterCheckpoint,
        AdapterModelParallelStrategy,
        Distillation,
        PeftCallback,
        PeftMixin,
        PeftPrecision,
        Trainer,
    )

# Lightning takes seconds to import; plain-PyTorch users of apply_adapters never pay for it.
_LIGHTNING_NAMES = (
    "AdapterModelParallelStrategy",
    "AdapterCheckpoint",
    "Distillation",
    "PeftCallback",
    "PeftMixin",
    "PeftPrecision",
    "Trainer",
)


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING_NAMES:
        import lightning_peft.lightning

        return getattr(lightning_peft.lightning, name)
    raise AttributeError(f"module 'lightning_peft' has no attribute {name!r}")


# The configs, apply / state / merge, PEFT files and export, the multi-adapter verbs, the
# Lightning classes and the two errors to catch (their base, LightningPeftError, and the
# rest live in lightning_peft.errors). Everything else lives in its module.
__all__ = [
    "IA3",
    "AdapterCheckpoint",
    "AdapterConfigError",
    "AdapterModelParallelStrategy",
    "AdapterStateError",
    "BitFit",
    "BottleneckAdapter",
    "Distillation",
    "LoRA",
    "PeftCallback",
    "PeftMixin",
    "PeftPrecision",
    "PrefixTuning",
    "PromptTuning",
    "Trainer",
    "Unfreeze",
    "adapter_names",
    "adapter_state_dict",
    "apply_adapters",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "load_adapter_state_dict",
    "load_peft",
    "merge_adapters",
    "merge_and_export",
    "mixed_batch",
    "save_peft",
    "set_active_adapters",
    "unmerge_adapters",
]
