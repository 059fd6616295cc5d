"""What makes a module an adapter: a small protocol, not a base class.

Code that needs "the adapter tensors of a model" asks the modules (``adapter_params``)
instead of guessing from names, so a base layer that happens to be called ``lora_x`` is
never mistaken for an adapter.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class AdapterModule(Protocol):
    """A module that adds trainable tensors to a frozen model."""

    def adapter_params(self) -> list[str]:
        """Names, relative to this module, of the tensors this adapter trains and saves."""
        ...


@runtime_checkable
class MergeableAdapter(AdapterModule, Protocol):
    """An adapter whose update can be folded into the base weight and taken out again."""

    merged: bool

    def merge(self) -> float:
        """Fold the update into the base weight; return the largest absolute error the base
        layer's storage introduced (0.0 for a float base of the adapter's dtype)."""
        ...

    def unmerge(self) -> float:
        """Take the update out of the base weight again; return the error as for merge."""
        ...


@runtime_checkable
class NamedAdapterModule(AdapterModule, Protocol):
    """A layer holding several named adapters at once (LoRA, IA3): the forward applies the
    ``active_adapters``; ``set_active_adapters`` and ``delete_adapter`` act on it."""

    configs: dict[str, Any]
    active_adapters: list[str]

    def delete_adapter(self, name: str) -> None: ...


@runtime_checkable
class RoutedAdapterModule(NamedAdapterModule, Protocol):
    """A named-adapter layer that sends each row of a batch through its own adapter while
    ``routing`` is set (``mixed_batch``)."""

    routing: Any


def held_adapter_names(module: nn.Module) -> list[str]:
    """The names of the adapters ``module`` holds (one, for single-adapter modules)."""
    if isinstance(module, NamedAdapterModule):
        return list(module.configs)
    return [getattr(module, "adapter_name", "default")]


def is_adapter(module: nn.Module) -> bool:
    return isinstance(module, AdapterModule)


# Methods that train tensors the base already has (BitFit's biases, an unfrozen head) add
# no module; they mark the module that owns the tensors. The mark is a plain attribute in
# the module's __dict__, so it survives deepcopy, pickling (ddp_spawn) and FSDP2's class swap.
_TRAINED_MARK = "_lightning_peft_trained"


def mark_trained_(
    module: nn.Module, tensor_names: tuple[str, ...], config: object, adapter_name: str
) -> None:
    """Record that ``module``'s own tensors ``tensor_names`` are trained by ``config``."""
    marks = module.__dict__.setdefault(_TRAINED_MARK, {})
    marks[adapter_name] = (config, tuple(tensor_names))


def trained_marks(module: nn.Module) -> dict[str, tuple[object, tuple[str, ...]]]:
    """``{adapter_name: (config, tensor names)}`` marked on ``module`` itself."""
    return module.__dict__.get(_TRAINED_MARK, {})
