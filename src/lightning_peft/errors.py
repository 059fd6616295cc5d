"""Exception types raised by lightning_peft.

Every one subclasses :class:`LightningPeftError` (``except LightningPeftError`` catches all
of them) and also the builtin a caller would naturally catch, so ``except ValueError`` keeps
working for code that does not know this package.
"""

from __future__ import annotations


class LightningPeftError(Exception):
    """The base of every error this package raises."""


class AdapterConfigError(LightningPeftError, ValueError):
    """An adapter config holds a value that cannot work (a rank of 0, a dropout of 1.5, ...)."""


class TargetModulesError(AdapterConfigError):
    """The target / exclude patterns select no module, or select one twice."""


class UnsupportedLayerError(AdapterConfigError, TypeError):
    """A targeted module is of a type the adapter cannot wrap."""


class AdapterStateError(LightningPeftError, ValueError):
    """An adapter state dict or checkpoint does not fit the adapters attached to the model."""


class AdapterStateKeyError(AdapterStateError, KeyError):
    """An adapter state dict has missing or unexpected keys."""

    def __str__(self) -> str:
        # KeyError quotes its message; a readable multi-line error is worth more here.
        return str(self.args[0]) if self.args else ""


class MissingAssetError(LightningPeftError, ModuleNotFoundError):
    """A model or dataset package used by the examples and benchmarks is not installed."""
