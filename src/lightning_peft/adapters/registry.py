"""The methods an adapter checkpoint may name, by config class name.

A checkpoint records each config as its class name and fields (``metadata.adapter_configs``);
``lightning-peft export`` and ``lightning-peft serve`` rebuild the configs from this table,
never by importing whatever a file names. The shipped methods are registered when
``lightning_peft.adapters`` is imported; a method defined elsewhere registers itself with
:func:`register_method` (``docs/extending.md``), as PEFT's ``register_peft_method`` does.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

from lightning_peft.errors import AdapterConfigError

ConfigT = TypeVar("ConfigT", bound=type)

_METHODS: dict[str, type] = {}


def register_method(config_class: ConfigT) -> ConfigT:
    """Let checkpoints name ``config_class`` (a frozen dataclass): usable as a decorator.

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
    return config_class


def method_class(name: object) -> type | None:
    """The config class registered under ``name``, or None."""
    return _METHODS.get(name) if isinstance(name, str) else None


def registered_methods() -> list[str]:
    """The names checkpoints may use, sorted."""
    return sorted(_METHODS)
