"""What makes a module an adapter: a small protocol, not a base class.

Code that needs "the adapter tensors of a model" asks the modules (``adapter_params``)
instead of guessing from names, so a base layer that happens to be called ``lora_x`` is
never mistaken for an adapter.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

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


def is_adapter(module: nn.Module) -> bool:
    return isinstance(module, AdapterModule)
