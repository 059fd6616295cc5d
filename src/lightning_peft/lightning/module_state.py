"""What lightning_peft remembers about a module between Lightning's hooks.

One record per module, kept under one key of its ``__dict__`` (out of ``state_dict``,
``named_modules`` and ``nn.Module.__getattr__``), so that ``PeftCallback``, ``PeftMixin``,
``PeftPrecision`` and ``Distillation`` read and write the same facts in the same form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

_KEY = "_lightning_peft_state"


@dataclass
class ModuleState:
    #: The adapters are attached (by the callback, the mixin or the plugin): not again.
    attached: bool = False
    #: The base is quantized (``PeftPrecision``, or ``Distillation``'s teacher): not again.
    quantized: bool = False
    #: The pre-hook that checks adapter-only state dicts before loading is registered.
    load_check: bool = False
    #: The RNG state from just before a validation pass, put back after it.
    rng_before_validation: dict[str, Any] | None = None
    #: The mixin's resume checks (a ``ResumeChecks``); the callback keeps its own.
    resume: Any = None


def state_of(module: nn.Module) -> ModuleState:
    """``module``'s record, created empty the first time it is asked for."""
    state = module.__dict__.get(_KEY)
    if state is None:
        state = module.__dict__[_KEY] = ModuleState()
    return state
