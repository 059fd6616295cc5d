"""Attach adapters to a model in place, and find them again."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, TypeVar

from torch import nn

from lightning_peft.adapters.protocol import AdapterModule, is_adapter
from lightning_peft.errors import AdapterConfigError
from lightning_peft.targeting import find_targets

ModelT = TypeVar("ModelT", bound=nn.Module)


class AdapterConfig(Protocol):
    """What :func:`apply_adapters` needs from a method's config (``LoRA``, ...)."""

    target_modules: str | tuple[str, ...]
    exclude_modules: str | tuple[str, ...]

    def can_wrap(self, module: nn.Module) -> bool: ...

    def wrap(self, layer: nn.Module, adapter_name: str = "default") -> nn.Module: ...


def apply_adapters(model: ModelT, config: AdapterConfig, *, name: str = "default") -> ModelT:
    """Wrap the layers ``config`` targets with adapters, in place, and freeze everything else.

    Every target is resolved and checked before any module is replaced, so a bad pattern
    leaves the model untouched. Afterwards exactly the adapter tensors require grad.

    Returns:
        ``model`` itself, for chaining.

    Raises:
        AdapterConfigError: ``name`` is not a usable adapter name.
        TargetModulesError: a pattern selects nothing, or only excluded / adapted modules.
        UnsupportedLayerError: a selected module is not a layer the method can wrap.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise AdapterConfigError(f"adapter name must be a Python identifier, got {name!r}")
    targets = find_targets(
        model,
        config.target_modules,
        config.exclude_modules,
        can_wrap=config.can_wrap,
        method=type(config).__name__,
    )
    for target in targets:
        parent_name, _, child_name = target.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, config.wrap(getattr(parent, child_name), name))
    freeze_base_(model)
    return model


def freeze_base_(model: nn.Module) -> None:
    """Set ``requires_grad`` on exactly the adapter tensors of ``model``."""
    model.requires_grad_(False)
    for _, module in adapter_modules(model):
        for param_name in module.adapter_params():
            module.get_parameter(param_name).requires_grad_(True)


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    """``(name, module)`` for each adapter in ``model``, in module order."""
    for module_name, module in model.named_modules():
        if is_adapter(module):
            yield module_name, module


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Full names of the adapter tensors of ``model``: the keys of its adapter state dict."""
    return [
        f"{module_name}.{param_name}" if module_name else param_name
        for module_name, module in adapter_modules(model)
        for param_name in module.adapter_params()
    ]
