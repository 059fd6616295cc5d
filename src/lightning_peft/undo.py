"""All-or-nothing: put a model back as it was when an operation on it fails half-way."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class InPlaceWrites:
    """Copies of the tensors an operation changed in place, to write back if it fails later.

    :meth:`watching` copies one module's tensors (to the CPU, so a GPU model needs no second
    copy of itself) before the step that may change them, and keeps only the copies of
    tensors that step did change: attaching LoRA to every layer of a large model holds no
    copy at all, a method that rewrites base weights (a merge, a PiSSA-style start) holds
    the ones it rewrote.
    """

    def __init__(self) -> None:
        self._kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    @contextmanager
    def watching(self, module: Any) -> Iterator[None]:
        before = [(tensor, _cpu_copy(tensor)) for tensor in _tensors(module)]
        try:
            yield
        except BaseException:
            self._kept.extend(before)  # failed inside: any of them may be half-written
            raise
        self._kept.extend((t, copy) for t, copy in before if not _same(t, copy))

    @torch.no_grad()
    def write_back(self) -> None:
        for tensor, original in reversed(self._kept):
            tensor.copy_(original.to(tensor.device))
        self._kept.clear()


@contextmanager
def restored_on_error(model: nn.Module) -> Iterator[InPlaceWrites]:
    """If the block raises, put every module of ``model`` back as it was before it.

    Each module's attributes are saved one level deep (its children, parameters, hooks, and
    lists and dicts such as a wrapper's ``configs`` or ``active_adapters``), with every
    parameter's ``requires_grad`` and the transformers configs' attributes: enough to undo
    rewiring modules and adding tensors, without copying any tensor. A step that writes into
    existing tensors runs inside the yielded guard's ``watching(module)``, and what it wrote
    is written back too.
    """
    saved = [
        (module, {k: _shallow_copy(v) for k, v in module.__dict__.items()})
        for module in model.modules()
    ]
    grads = [(param, param.requires_grad) for param in model.parameters()]
    configs = [(c, dict(vars(c))) for c in _transformers_configs(model)]
    writes = InPlaceWrites()
    try:
        yield writes
    except BaseException:
        for module, attributes in saved:
            module.__dict__.clear()
            module.__dict__.update(attributes)
        for param, requires_grad in grads:
            param.requires_grad_(requires_grad)
        for config, attributes in configs:
            vars(config).clear()
            vars(config).update(attributes)
        writes.write_back()
        raise


def _tensors(module: Any) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


def _same(tensor: torch.Tensor, original: torch.Tensor) -> bool:
    now = tensor.detach()
    return now.shape == original.shape and torch.equal(now.cpu(), original)


def _transformers_configs(model: nn.Module) -> list[Any]:
    found: dict[int, Any] = {}
    for module in model.modules():
        # The instance's own attribute: an adapter wrapper's ``config`` is a property that
        # refuses when several adapters are active.
        config = vars(module).get("config")
        if config is not None and hasattr(config, "to_dict"):
            found.setdefault(id(config), config)
    return list(found.values())


def _shallow_copy(value: Any) -> Any:
    return copy.copy(value) if isinstance(value, (dict, list, set)) else value
