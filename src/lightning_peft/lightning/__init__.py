"""The only layer that imports Lightning: callbacks, the mixin, checkpointing glue."""

from lightning_peft.lightning.callbacks import AdapterCheckpoint, PeftCallback
from lightning_peft.lightning.mixin import PeftMixin
from lightning_peft.lightning.summary import PeftModelSummary

__all__ = ["AdapterCheckpoint", "PeftCallback", "PeftMixin", "PeftModelSummary"]
