"""Quantize (under ``PeftPrecision``) and attach adapters to a LightningModule, once.

Shared by ``PeftCallback.setup`` and ``PeftMixin.configure_model`` / ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning.pytorch as pl
from torch import nn

from lightning_peft.injection import AdapterConfig, apply_adapters
from lightning_peft.lightning.precision import PeftPrecision, peft_precision

_ATTACHED = "_lightning_peft_attached"


def attach_adapters_once(
    trainer: pl.Trainer | None,
    module: nn.Module,
    configs: Callable[[PeftPrecision | None], Sequence[AdapterConfig]],
    name: str = "default",
) -> bool:
    """Quantize ``module``'s base if the Trainer runs ``PeftPrecision``, then attach the
    adapters ``configs(plugin)`` returns. Does nothing if this already happened; returns
    whether it happened now."""
    if module.__dict__.get(_ATTACHED, False):
        return False
    plugin = peft_precision(trainer)
    if plugin is None:
        apply_adapters(module, list(configs(plugin)), name=name)
    else:  # quantized on the device it trains on, then adapters (LoftQ needs both at once)
        plugin.quantize_base(module, trainer.strategy.root_device, configs(plugin), name)
    module.__dict__[_ATTACHED] = True
    return True
