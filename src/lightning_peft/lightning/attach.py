"""Quantize (under ``PeftPrecision``) and attach adapters to a LightningModule, once.

Shared by ``PeftCallback.setup`` and ``PeftMixin.configure_model`` / ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_peft.adapters.heads import task_head_names
from lightning_peft.checkpoint.peft_format import save_pretrained_writes_adapters_
from lightning_peft.injection import AdapterConfig, apply_adapters
from lightning_peft.lightning.module_state import state_of
from lightning_peft.lightning.precision import PeftPrecision, peft_precision
from lightning_peft.protocol import TrainsWholeModules, trained_marks


def attach_adapters_once(
    trainer: pl.Trainer | None,
    module: nn.Module,
    configs: Callable[[PeftPrecision | None], Sequence[AdapterConfig]],
    name: str = "default",
    train_head: bool = True,
) -> bool:
    """Quantize ``module``'s base if the Trainer runs ``PeftPrecision``, then attach the
    adapters ``configs(plugin)`` returns (and a task head, see ``apply_adapters``). Does
    nothing if this already happened; returns whether it happened now."""
    if state_of(module).attached:
        return False
    plugin = peft_precision(trainer)
    given = list(configs(plugin))
    if plugin is None or trainer is None:
        apply_adapters(module, given, name=name, train_head=train_head)
    else:  # quantized on the device it trains on, then adapters (LoftQ needs both at once)
        plugin.quantize_base(module, trainer.strategy.root_device, given, name, train_head)
    state_of(module).attached = True
    # The HF call people make after training: it writes the adapters, as PEFT's does.
    save_pretrained_writes_adapters_(module, name)
    _announce_head(module, name, given)
    return True


def _announce_head(module: nn.Module, name: str, given: list[AdapterConfig]) -> None:
    """Say which task head trains because ``train_head`` is on (none the configs named)."""
    heads = [
        head
        for head in task_head_names(module)
        if any(
            isinstance(config, TrainsWholeModules) and config not in given
            for config, _ in trained_marks(module.get_submodule(head)).values()
        )
    ]
    if heads:
        count = sum(p.numel() for h in heads for p in module.get_submodule(h).parameters())
        rank_zero_info(
            f"Training the task head {', '.join(heads)} ({count:,} parameters) of "
            f"{type(module).__name__}'s model with adapter {name!r}: a task class adds it "
            "on top of its backbone, and it starts random. train_head=False keeps it frozen."
        )
