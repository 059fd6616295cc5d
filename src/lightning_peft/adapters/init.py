"""Adapter initial values as a function of the seed and the layer's name, nothing else.

Drawing them from the global RNG makes them depend on everything that drew before: a DDP
process group set up, a precision plugin attaching later than a callback would, a model
built in another order. Inside :func:`initial_values_for` (``apply_adapters`` wraps every
attachment in it) each method draws instead from a generator seeded by the global seed
(see below), the layer's name inside its
transformers model (as a PEFT file names it) and the adapter's name. So the callback, the
mixin, the precision flag and ``apply_adapters``, on one process or many, start alike.

The seed is Lightning's global seed where ``L.seed_everything`` set one (it exports it as
``PL_GLOBAL_SEED``, and DDP re-seeds every process with it), else ``torch.initial_seed()``:
a later ``torch.manual_seed`` inside a model's constructor does not move it.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

_LAYER: ContextVar[str | None] = ContextVar("lightning_peft_initialising", default=None)
# Initial values computed from the base weights before attachment (LoftQ), by layer name.
_PRESETS: ContextVar[dict[str, tuple[torch.Tensor, ...]] | None] = ContextVar(
    "lightning_peft_presets", default=None
)


@contextmanager
def initial_values_for(layer_name: str) -> Iterator[None]:
    """Adapters created inside draw their initial values from ``layer_name``'s generator."""
    token = _LAYER.set(layer_name)
    try:
        yield
    finally:
        _LAYER.reset(token)


@contextmanager
def preset_values(table: dict[str, tuple[torch.Tensor, ...]]) -> Iterator[None]:
    """Adapters created inside may take their initial values from ``table`` (layer name, as
    :func:`initial_values_for` names it, to tensors) instead of drawing them."""
    token = _PRESETS.set(table)
    try:
        yield
    finally:
        _PRESETS.reset(token)


_LOADING: ContextVar[bool] = ContextVar("lightning_peft_loading", default=False)


@contextmanager
def values_to_be_loaded() -> Iterator[None]:
    """Adapters created inside get their values from a state dict right after, so an init
    that needs more than the layer (LoftQ needs the float weight) may start empty."""
    token = _LOADING.set(True)
    try:
        yield
    finally:
        _LOADING.reset(token)


def values_will_be_loaded() -> bool:
    return _LOADING.get()


def preset_for_layer() -> tuple[torch.Tensor, ...] | None:
    """The preset values of the layer being initialised, or None."""
    layer, table = _LAYER.get(), _PRESETS.get()
    if layer is None or table is None:
        return None
    return table.get(layer)


def global_seed() -> int:
    """``L.seed_everything``'s seed where it set one, else the seed of torch's global RNG."""
    seed = os.environ.get("PL_GLOBAL_SEED", "")
    return int(seed) if seed.lstrip("-").isdigit() else torch.initial_seed()


def init_generator(adapter_name: str) -> torch.Generator | None:
    """A CPU generator for ``adapter_name`` on the layer being initialised, or None (the
    global RNG, as torch's own modules use) outside :func:`initial_values_for`."""
    layer = _LAYER.get()
    if layer is None:
        return None
    key = f"{global_seed()}|{layer}|{adapter_name}".encode()
    seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)
    return torch.Generator(device="cpu").manual_seed(seed)


def empty_linear(
    in_features: int, out_features: int, *, bias: bool, device: torch.device | str
) -> nn.Linear:
    """An uninitialised ``nn.Linear`` (built on the meta device: no draw from the global RNG)."""
    return nn.Linear(in_features, out_features, bias=bias, device="meta").to_empty(device=device)


@torch.no_grad()
def reset_linear_(linear: nn.Linear, generator: torch.Generator | None) -> nn.Linear:
    """``nn.Linear``'s own initialisation (Kaiming-uniform weight, uniform bias), drawn from
    ``generator``; the layer must be on the CPU, where the generator is."""
    nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
    if linear.bias is not None:
        bound = 1 / math.sqrt(linear.in_features) if linear.in_features > 0 else 0.0
        nn.init.uniform_(linear.bias, -bound, bound, generator=generator)
    return linear
