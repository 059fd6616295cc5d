"""Fold adapter updates into the base weights (for inference) and take them out again."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lightning_peft.adapters.protocol import MergeableAdapter
from lightning_peft.errors import AdapterStateError
from lightning_peft.injection import adapter_modules


@dataclass(frozen=True)
class MergeReport:
    """What :func:`merge_adapters` / :func:`unmerge_adapters` did.

    Attributes:
        changed: layers merged (or unmerged) by this call.
        unchanged: layers already in the requested state; left as they were.
        errors: per changed layer, the largest absolute weight error its storage introduced
            (0.0 for float32 bases; the re-quantization error for 4-bit and 8-bit bases).
        not_mergeable: adapters whose method cannot be merged (left active).
    """

    changed: int
    unchanged: int
    errors: dict[str, float] = field(default_factory=dict)
    not_mergeable: tuple[str, ...] = ()

    @property
    def max_abs_error(self) -> float:
        return max(self.errors.values(), default=0.0)


def merge_adapters(model: nn.Module) -> MergeReport:
    """Merge every adapter of ``model`` into its base layer, in place.

    Afterwards the model computes the same function with the cost of the base model alone.
    Merging an already merged layer is a no-op (counted in ``unchanged``), never a double add.
    A quantized base is dequantized, updated and re-quantized with its own settings; the
    report says how much weight error that rounding introduced.

    Raises:
        AdapterStateError: ``model`` has no adapters.
    """
    return _set_merged(model, merged=True)


def unmerge_adapters(model: nn.Module) -> MergeReport:
    """Take merged updates out of the base layers again, in place (see :func:`merge_adapters`)."""
    return _set_merged(model, merged=False)


def _set_merged(model: nn.Module, *, merged: bool) -> MergeReport:
    adapters = list(adapter_modules(model))
    if not adapters:
        raise AdapterStateError(
            f"{type(model).__name__} has no adapters; call apply_adapters first"
        )
    errors: dict[str, float] = {}
    unchanged = 0
    not_mergeable: list[str] = []
    for name, module in adapters:
        if not isinstance(module, MergeableAdapter):
            not_mergeable.append(name)
        elif module.merged == merged:
            unchanged += 1
        else:
            errors[name] = module.merge() if merged else module.unmerge()
    return MergeReport(len(errors), unchanged, errors, tuple(not_mergeable))
