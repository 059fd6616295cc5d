"""The methods an adapter checkpoint may name, by config class name.

A checkpoint records each config as its class name and fields (``metadata.adapter_configs``);
``lightning-peft export`` and ``lightning-peft serve`` rebuild the configs from this table,
never by importing whatever a file names. The shipped methods are registered when
``lightning_peft.adapters`` is imported; a method defined elsewhere registers itself with
:func:`register_method` (``docs/extending.md``), as PEFT's ``register_peft_method`` does.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from lightning_peft.errors import AdapterConfigError

if TYPE_CHECKING:
    from lightning_peft.adapters.peft_mapping import PeftMapping

ConfigT = TypeVar("ConfigT", bound=type)

_METHODS: dict[str, type] = {}
_PEFT: dict[type, PeftMapping] = {}  # config class -> how it maps to PEFT's files


def register_method(config_class: ConfigT, *, peft: PeftMapping | None = None) -> ConfigT:
    """Let checkpoints name ``config_class`` (a frozen dataclass): usable as a decorator.
    ``peft`` says how the method maps to Hugging Face PEFT's files (``adapters/
    peft_mapping.py``); without it ``save_peft`` refuses the method by name.

    Raises:
        AdapterConfigError: it is not a dataclass (its fields are what a checkpoint records),
            or another class already has its name.
    """
    if not (isinstance(config_class, type) and dataclasses.is_dataclass(config_class)):
        raise AdapterConfigError(
            f"register_method takes a dataclass config class, got {config_class!r}: a "
            "checkpoint records the config's fields and rebuilds it from them"
        )
    name = config_class.__name__
    registered = _METHODS.setdefault(name, config_class)
    if registered is not config_class:
        raise AdapterConfigError(
            f"a method named {name!r} is registered already "
            f"({registered.__module__}.{registered.__qualname__}); give "
            f"{config_class.__module__}.{config_class.__qualname__} another name"
        )
    if peft is not None:
        _PEFT[config_class] = peft
    # A module that records its config with save_hyperparameters() keeps it in every
    # checkpoint, which Lightning and torch load with weights_only=True: allow the class.
    torch.serialization.add_safe_globals([config_class])
    return config_class


def method_class(name: object) -> type | None:
    """The config class registered under ``name``, or None."""
    return _METHODS.get(name) if isinstance(name, str) else None


def registered_methods() -> list[str]:
    """The names checkpoints may use, sorted."""
    return sorted(_METHODS)


def peft_mapping(config: Any) -> PeftMapping | None:
    """How ``config``'s method maps to the PEFT format, or None where it has none."""
    return _PEFT.get(type(config))


def peft_mapping_named(peft_type: object) -> PeftMapping | None:
    """The registered mapping whose ``peft_type`` is ``peft_type``, or None."""
    return next((m for m in _PEFT.values() if m.peft_type == peft_type), None)


def peft_types() -> list[str]:
    """The PEFT types this package reads, sorted."""
    return sorted(m.peft_type for m in _PEFT.values())
