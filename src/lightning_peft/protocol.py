"""What makes a module an adapter, and a config a method: small protocols, not base classes.

Code that needs "the adapter tensors of a model" asks the modules (``adapter_params``)
instead of guessing from names, so a base layer that happens to be called ``lora_x`` is
never mistaken for an adapter. Everything outside ``lightning_peft.adapters`` asks these
protocols (and the helpers below), never a concrete class, so a method defined elsewhere
(``docs/extending.md``) is handled as the shipped ones are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from torch import nn

# -- configs -------------------------------------------------------------------------------


@runtime_checkable
class LayerAdapterConfig(Protocol):
    """A method that wraps the layers it selects (``LoRA``, ``IA3``, ``BottleneckAdapter``)."""

    target_modules: str | Sequence[str]
    exclude_modules: str | Sequence[str]

    def can_wrap(self, module: nn.Module) -> bool: ...

    def wrap(self, layer: nn.Module, adapter_name: str, module_name: str) -> nn.Module:
        """The adapter module that replaces ``layer`` (or ``layer`` itself, joined by another
        named adapter)."""
        ...


@runtime_checkable
class WrapsLayers(Protocol):
    """What the command line checks a layer method's class path against: jsonargparse
    matches a protocol's methods by signature and cannot match data attributes, so
    :class:`LayerAdapterConfig` minus its fields."""

    def can_wrap(self, module: nn.Module) -> bool: ...


@runtime_checkable
class ModelAdapterConfig(Protocol):
    """A method that acts on the model as a whole (``PromptTuning``, ``BitFit``, ...)."""

    def check(self, model: nn.Module) -> None:
        """Raise, without changing ``model``, if the method cannot be attached to it."""
        ...

    def attach(self, model: nn.Module, adapter_name: str) -> None: ...


@runtime_checkable
class ModelDefaults(Protocol):
    """A config whose defaults depend on the model (IA3's targets by model type)."""

    def for_model(self, model: nn.Module) -> Any: ...


@runtime_checkable
class TrainsWholeModules(ModelAdapterConfig, Protocol):
    """A method that trains whole modules of the base (``Unfreeze``; PEFT's
    ``modules_to_save``): no task head is added beside the modules it selects."""

    def selected_names(self, model: nn.Module) -> list[str]: ...


def routes_rows(config: object) -> bool:
    """Whether ``config``'s method sends each row of a batch through its own adapter
    (``mixed_batch``): configs say so with a ``routable`` attribute; without one, no."""
    return getattr(config, "routable", False) is True


# -- modules -------------------------------------------------------------------------------


@runtime_checkable
class AdapterModule(Protocol):
    """A module that adds trainable tensors to a frozen model. While ``disabled`` is set
    (``disable_adapters``) its forward computes the base model's output."""

    disabled: bool

    def adapter_params(self) -> list[str]:
        """Names, relative to this module, of the tensors this adapter trains and saves."""
        ...


@runtime_checkable
class WrappingAdapter(AdapterModule, Protocol):
    """An adapter that replaced a layer of the model and holds it as ``base_layer``."""

    base_layer: nn.Module


@runtime_checkable
class SingleAdapterModule(AdapterModule, Protocol):
    """An adapter module holding one adapter: its ``config`` under ``adapter_name``."""

    config: Any
    adapter_name: str


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
class NamedAdapterModule(WrappingAdapter, Protocol):
    """A layer holding several named adapters at once (LoRA, IA3): the forward applies the
    ``active_adapters``; ``set_active_adapters`` and ``delete_adapter`` act on it (a layer
    left with none goes back to its ``base_layer``)."""

    configs: dict[str, Any]
    active_adapters: list[str]

    def delete_adapter(self, name: str) -> None: ...


@runtime_checkable
class RoutedAdapterModule(NamedAdapterModule, Protocol):
    """A named-adapter layer that sends each row of a batch through its own adapter while
    ``routing`` is set (``mixed_batch``)."""

    routing: Any


def module_configs(module: object) -> dict[str, Any]:
    """``{adapter name: config}`` of the adapters ``module`` holds (none for a plain module)."""
    if isinstance(module, NamedAdapterModule):
        return dict(module.configs)
    if isinstance(module, SingleAdapterModule):
        return {module.adapter_name: module.config}
    return {}


def held_adapter_names(module: object) -> list[str]:
    """The names of the adapters ``module`` holds (one, for single-adapter modules)."""
    return list(module_configs(module)) or ["default"]


def is_merged(module: object) -> bool:
    """Whether ``module`` is a mergeable adapter folded into its base layer now."""
    return isinstance(module, MergeableAdapter) and module.merged


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
