"""``load_adapter_checkpoint``: a LightningModule with the adapters of an adapter-only
checkpoint, for modules that do not attach adapters themselves.

``LM.load_from_checkpoint(path)`` builds the module and loads the file's state dict into it;
a module trained with ``PeftCallback`` (or the precision flag) has no adapters until a
Trainer attaches them, so Lightning finds nothing to load them into (``strict=False`` drops
them without a word). This builds the module the same way, then attaches the adapters the
checkpoint's metadata names, over a base quantized as the run's was, and loads them checked.
A ``PeftMixin`` module needs none of it: ``load_from_checkpoint`` works there.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch

from lightning_peft.checkpoint import (
    check_adapter_state_dict,
    check_base_fingerprint,
    load_adapter_state_dict,
    read_metadata,
)
from lightning_peft.checkpoint.metadata import config_from_metadata
from lightning_peft.errors import AdapterStateError
from lightning_peft.injection import apply_adapters
from lightning_peft.lightning.module_state import state_of
from lightning_peft.lightning.precision import PeftPrecision, split_precision_flag

Module = TypeVar("Module", bound=pl.LightningModule)


def load_adapter_checkpoint(
    module: type[Module] | Module, path: str | os.PathLike[str], **hparams: Any
) -> Module:
    """``module`` (a LightningModule class, built from the checkpoint's hyperparameters
    updated with ``hparams`` as ``load_from_checkpoint`` does, or an instance) with the
    adapters of the adapter-only checkpoint at ``path`` attached and loaded.

    The base is quantized first when the run trained under a 4-bit or int8 precision flag
    (the checkpoint records which). Keys, shapes and the base's fingerprint are checked
    before any tensor is copied.

    Raises:
        AdapterStateError: not an adapter checkpoint, adapters under several names, or a
            checkpoint that does not fit the module (other base, other adapters).
    """
    source = f"checkpoint {os.fspath(path)!r}"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    metadata = read_metadata(checkpoint, source)
    if isinstance(module, type):
        module = module(
            **_init_arguments(module, {**checkpoint.get("hyper_parameters", {}), **hparams})
        )
    names = {entry["name"] for entry in metadata["adapters"]}
    if len(names) != 1:
        raise AdapterStateError(f"{source} holds adapters named {sorted(names)}: load one name")
    name = names.pop()
    configs = [config_from_metadata(entry) for entry in metadata["adapters"]]
    flag = metadata.get("precision")
    parsed = split_precision_flag(flag) if isinstance(flag, str) else None
    if parsed is not None and not state_of(module).quantized:
        PeftPrecision(*parsed, optimizer=None).quantize_base(module, None, configs, name, False)
    else:
        apply_adapters(module, configs, name=name, train_head=False)
    state_of(module).attached = True
    state = dict(checkpoint["state_dict"])
    check_adapter_state_dict(module, state)
    check_base_fingerprint(metadata, module, source)
    load_adapter_state_dict(module, state)
    return module


def _init_arguments(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` the class's ``__init__`` takes (all of them if it takes ``**kwargs``)."""
    parameters = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return values
    return {k: v for k, v in values.items() if k in parameters}
