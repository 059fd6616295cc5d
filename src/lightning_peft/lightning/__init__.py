"""The only layer that imports Lightning: callbacks, the mixin, the precision plugin, the "
"Trainer."""

from lightning_peft.lightning.averaging import AdapterWeightAveraging
from lightning_peft.lightning.callbacks import AdapterCheckpoint, PeftCallback
from lightning_peft.lightning.distillation import Distillation
from lightning_peft.lightning.generation import GenerationSamples
from lightning_peft.lightning.interrupts import InterruptCheckpoint
from lightning_peft.lightning.loading import load_adapter_checkpoint
from lightning_peft.lightning.mixin import PeftMixin
from lightning_peft.lightning.precision import PeftPrecision
from lightning_peft.lightning.progress import ProgressLog
from lightning_peft.lightning.strategies import AdapterModelParallelStrategy
from lightning_peft.lightning.summary import PeftModelSummary
from lightning_peft.lightning.trainer import Trainer

__all__ = [
    "AdapterCheckpoint",
    "AdapterModelParallelStrategy",
    "AdapterWeightAveraging",
    "Distillation",
    "GenerationSamples",
    "InterruptCheckpoint",
    "PeftCallback",
    "PeftMixin",
    "PeftModelSummary",
    "PeftPrecision",
    "ProgressLog",
    "Trainer",
    "load_adapter_checkpoint",
]
