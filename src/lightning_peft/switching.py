"""Many named adapters on one base model: choose, disable, delete, and route per row.

Adapters attached under different names (``apply_adapters(model, config, name="sentiment")``)
share the frozen base. Layer methods that support it (LoRA, IA3) hold every name in one
wrapper; the forward applies the *active* ones, or, inside :func:`mixed_batch`, each row's
own, so one batch can serve (and train) several tasks at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_peft.adapters.routing import Routing
from lightning_peft.errors import AdapterStateError
from lightning_peft.injection import (
    adapter_modules,
    freeze_base_,
    replace_module_,
    train_active_adapters_only_,
)
from lightning_peft.protocol import (
    NamedAdapterModule,
    RoutedAdapterModule,
    held_adapter_names,
    is_merged,
    trained_marks,
)


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters attached to ``model``, in the order first seen."""
    names: dict[str, None] = {}
    for _, module in adapter_modules(model):
        names.update(dict.fromkeys(held_adapter_names(module)))
    return list(names)


def _switchable(model: nn.Module) -> list[Any]:  # each a NamedAdapterModule
    return [m for _, m in adapter_modules(model) if isinstance(m, NamedAdapterModule)]


def _check_names(model: nn.Module, names: Sequence[str]) -> None:
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise AdapterStateError(f"no adapter named {unknown} in the model; it has {known}")


def set_active_adapters(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the adapters every layer applies (in a layer holding several of them,
    their updates add up). Training then updates only these: the other LoRA and IA3
    adapters are frozen (``requires_grad=False``), so an optimizer built afterwards leaves
    them alone. Methods that are not layers (prompts, prefixes, BitFit, Unfreeze) are not
    switched.

    Raises:
        AdapterStateError: a name is not attached, or a layer is merged.
    """
    names = [names] if isinstance(names, str) else list(names)
    _check_names(model, names)
    for module in _switchable(model):
        if is_merged(module):
            raise AdapterStateError("unmerge_adapters(model) before switching adapters")
        module.active_adapters = [n for n in names if n in module.configs]
        train_active_adapters_only_(module)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer; a layer left with no adapter goes back to
    its plain base layer.

    Raises:
        AdapterStateError: no adapter has that name, or it is the only one of a layer that
            cannot be unwrapped (a method other than LoRA / IA3).
    """
    _check_names(model, [name])
    for module_name, module in adapter_modules(model):  # every refusal before any change
        if not isinstance(module, NamedAdapterModule) and held_adapter_names(module) == [name]:
            raise AdapterStateError(
                f"{module_name} ({type(module).__name__}) holds one adapter and cannot "
                "delete it; rebuild the model without it"
            )
    for _, module in list(adapter_modules(model)):
        if not isinstance(module, NamedAdapterModule) or name not in module.configs:
            continue
        module.delete_adapter(name)
        if not module.configs:
            replace_module_(model, module, module.base_layer)
    freeze_base_(model)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes its base model's output (adapters bypassed).

    Raises:
        AdapterStateError: an adapter is merged into its base layer (unmerge it first).
    """
    modules = [m for _, m in adapter_modules(model)]
    if any(trained_marks(m) for m in model.modules()):
        raise AdapterStateError(
            "BitFit and Unfreeze train the base model's own tensors, so there is no separate "
            "base output to return to; disable_adapters cannot bypass them"
        )
    if any(is_merged(m) for m in modules):
        raise AdapterStateError("merged adapters cannot be disabled: unmerge_adapters(model) first")
    previous = [m.disabled for m in modules]
    for module in modules:
        module.disabled = True
    try:
        yield model
    finally:
        for module, was in zip(modules, previous, strict=True):
            module.disabled = was


@contextmanager
def mixed_batch(
    model: nn.Module,
    rows: Sequence[str | None] | torch.Tensor,
    names: Sequence[str | None] | None = None,
) -> Iterator[nn.Module]:
    """Within the block, row ``b`` of every batch goes through its own adapter.

    Args:
        rows: one adapter name per row (``None``: the base model alone), or a ``(B,)``
            tensor of indices into ``names``.
        names: the adapter names ``rows`` indexes (needed with a tensor).

    Each layer gathers the rows' adapter weights and applies them in one batched matmul (no
    loop over rows); a row's adapter receives gradient from that row only. LoRA (not DoRA)
    and IA3 layers route; rows whose adapter a layer lacks pass through it unchanged. To
    train, keep every routed adapter active (as attached, or ``set_active_adapters(model,
    [...])``): an inactive adapter is frozen.

    Raises:
        AdapterStateError: an unknown name, a merged layer, or a model with nothing to route.
    """
    if isinstance(rows, torch.Tensor):
        if names is None:
            raise AdapterStateError("mixed_batch with an index tensor needs names=[...]")
        names, index = tuple(names), rows.long()
        if index.numel() and (index.min() < 0 or index.max() >= len(names)):
            raise AdapterStateError(
                f"row indices must lie in [0, {len(names)}), got {rows.tolist()}"
            )
    else:
        names = tuple(dict.fromkeys(rows))
        index = torch.tensor([names.index(r) for r in rows], dtype=torch.long)
    _check_names(model, [n for n in names if n is not None])
    modules = [m for m in _switchable(model) if isinstance(m, RoutedAdapterModule)]
    if not modules:
        raise AdapterStateError("mixed_batch routes LoRA and IA3 adapters; the model has none")
    if any(is_merged(m) for m in modules):
        raise AdapterStateError("unmerge_adapters(model) before routing a mixed batch")
    routing = Routing(names, index)
    for module in modules:
        module.routing = routing
    try:
        yield model
    finally:
        for module in modules:
            module.routing = None
