"""``lightning_peft.Trainer``: ``lightning.Trainer`` that also accepts ``precision="nf4-lora"``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from lightning_peft.lightning.callbacks import PeftCallback
from lightning_peft.lightning.precision import PeftPrecision, split_precision_flag


class Trainer(pl.Trainer):
    """A ``lightning.Trainer`` whose ``precision`` also takes the modes of :class:`PeftPrecision`:
    ``"nf4-lora"``, ``"nf4-lora-nodq"``, ``"fp4-lora"``, ``"int8-lora"``, each optionally with a
    compute suffix (``"nf4-lora-bf16-mixed"``). Every other argument goes to Lightning as is.

    Lightning validates ``precision`` against a closed list, so the mode becomes a
    ``PeftPrecision`` plugin here; and unless a ``PeftCallback`` is given, one is added so that
    adapters exist before a checkpoint is restored and checkpoints stay adapter-only.
    """

    def __init__(
        self,
        *args: Any,
        precision: Any = None,
        plugins: Any = None,
        callbacks: Any = None,
        **kwargs: Any,
    ) -> None:
        plugins = (
            list(plugins) if isinstance(plugins, (list, tuple)) else ([plugins] if plugins else [])
        )
        callbacks = (
            list(callbacks)
            if isinstance(callbacks, (list, tuple))
            else ([callbacks] if callbacks else [])
        )
        flag = split_precision_flag(precision) if isinstance(precision, str) else None
        if flag is not None:
            plugins.append(PeftPrecision(*flag))
            precision = None
        has_peft_precision = any(isinstance(plugin, PeftPrecision) for plugin in plugins)
        if has_peft_precision and not any(
            isinstance(callback, PeftCallback) for callback in callbacks
        ):
            callbacks.append(PeftCallback())
        super().__init__(
            *args,
            precision=precision,
            plugins=plugins or None,
            callbacks=callbacks or None,
            **kwargs,
        )
