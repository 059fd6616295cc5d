"""A ``ModelSummary`` that counts a 4-bit weight as the parameters it encodes.

Lightning's summary counts ``tensor.numel()``; a packed bitsandbytes 4-bit weight holds two
parameters per element, so an NF4 model would show about half its real size.
"""

from __future__ import annotations

from typing import Any, cast

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
from lightning.pytorch.utilities.model_summary import model_summary as summary_module
from typing_extensions import override

from lightning_peft._compat import summary_max_depth
from lightning_peft.quantization import real_numel


class _RealCountSummary(summary_module.ModelSummary):
    def __init__(self, model: pl.LightningModule, max_depth: int = 1) -> None:
        self.counted = model  # set first: the parent's __init__ reads the counts
        super().__init__(model, max_depth=max_depth)

    @property
    @override
    def param_nums(self) -> list[int]:
        return [sum(real_numel(p) for p in module.parameters()) for _, module in self.named_modules]

    @property
    @override
    def total_parameters(self) -> int:
        return sum(real_numel(p) for p in self.counted.parameters())

    @property
    @override
    def trainable_parameters(self) -> int:
        return sum(real_numel(p) for p in self.counted.parameters() if p.requires_grad)

    @property
    @override
    def model_size(self) -> float:
        """Megabytes the parameters really take (a 4-bit weight: half a byte each)."""
        return sum(p.numel() * p.element_size() for p in self.counted.parameters()) * 1e-6


class _RealCounts(ModelSummary):
    @override
    def _summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        return _RealCountSummary(pl_module, max_depth=summary_max_depth(self))


class PeftModelSummary(_RealCounts, ModelSummary):
    """Lightning's ``ModelSummary`` callback with parameter counts that are right for 4-bit
    bases. ``PeftCallback`` and ``PeftMixin`` swap the Trainer's default summary for it."""


class PeftRichModelSummary(_RealCounts, RichModelSummary):
    """``RichModelSummary`` (Lightning's default when ``rich`` is installed), counted right."""


_REPLACEMENTS: dict[type, type] = {
    ModelSummary: PeftModelSummary,
    RichModelSummary: PeftRichModelSummary,
}


def _counting_right(cls: type) -> type:
    """``cls`` (a user's ``ModelSummary`` subclass) with the counting-right summary."""
    if cls not in _REPLACEMENTS:
        _REPLACEMENTS[cls] = type(cls.__name__, (_RealCounts, cls), {"__module__": cls.__module__})
    return _REPLACEMENTS[cls]


def use_real_parameter_counts(trainer: pl.Trainer) -> None:
    """Make the Trainer's summary callbacks count 4-bit weights right: Lightning's own and any
    subclass of them (a user's), whose instances keep their settings and state."""
    callbacks: list[Any] = cast(Any, trainer).callbacks  # set by Lightning, not declared
    for callback in callbacks:
        if isinstance(callback, ModelSummary) and not isinstance(callback, _RealCounts):
            # The same object, its class extended by the counting: nothing it holds is lost.
            callback.__class__ = _counting_right(type(callback))
