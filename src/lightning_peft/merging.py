"""Fold adapter updates into the base weights (for inference) and take them out again."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_peft.errors import AdapterStateError
from lightning_peft.injection import adapter_modules
from lightning_peft.protocol import MergeableAdapter
from lightning_peft.undo import restored_on_error


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
    # A layer that refuses (or runs out of memory) late leaves every layer as it was, a tied
    # head tied again: never a half-merged model.
    with restored_on_error(model) as writes:
        for name, module in adapters:
            if not isinstance(module, MergeableAdapter):
                not_mergeable.append(name)
            elif module.merged == merged:
                unchanged += 1
            else:
                with writes.watching(module):
                    if merged:
                        untie_base_weight_(model, module)
                    errors[name] = module.merge() if merged else module.unmerge()
    return MergeReport(len(errors), unchanged, errors, tuple(not_mergeable))


def untie_base_weight_(model: nn.Module, wrapper: Any) -> bool:
    """Give ``wrapper``'s base layer its own copy of a weight it shares with another module
    (a tied ``lm_head`` and ``embed_tokens``), so merging into it changes only that layer;
    ``model``'s transformers config then says the weights are no longer tied. Returns
    whether it untied."""
    base: Any = wrapper.base_layer
    weight = getattr(base, "weight", None)
    holders = [
        name
        for name, param in model.named_parameters(remove_duplicate=False)
        if param is weight and not name.startswith(_prefix_of(model, wrapper))
    ]
    if weight is None or not holders:
        return False
    base.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    for module in model.modules():
        config: Any = getattr(module, "config", None)
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    return True


def _prefix_of(model: nn.Module, module: nn.Module) -> str:
    name = next(n for n, m in model.named_modules() if m is module)
    return f"{name}." if name else ""
