"""Adapter state dicts: the trainable tensors of a model and nothing else."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lightning_peft.errors import AdapterStateError, AdapterStateKeyError
from lightning_peft.injection import adapter_modules, adapter_parameter_names
from lightning_peft.protocol import is_merged

_SHOWN = 8  # keys listed per problem in an error; the rest are counted


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``model`` keyed by their full names, detached (not copied).

    The keys are the names ``model.state_dict()`` uses, so this is that state dict with the
    frozen base left out.
    """
    return {name: model.get_parameter(name).detach() for name in adapter_parameter_names(model)}


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter tensors into ``model``'s adapters, checking keys and shapes first.

    Nothing is copied unless every key of the model's adapters is present with the right
    shape and no other key is given.

    Raises:
        AdapterStateKeyError: missing or unexpected keys (both listed).
        AdapterStateError: a shape differs, or an adapter is merged (unmerge it first).
    """
    state_dict = in_model_keys(model, state_dict)
    check_adapter_state_dict(model, state_dict)
    for name in adapter_parameter_names(model):
        model.get_parameter(name).copy_(state_dict[name])


def in_model_keys(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state_dict`` keyed as ``model`` names its adapter tensors, whether either side went
    through ``torch.compile`` (which adds ``_orig_mod.`` to a compiled module's keys)."""
    names = {n.replace("_orig_mod.", ""): n for n in adapter_parameter_names(model)}
    return {names.get(k.replace("_orig_mod.", ""), k): v for k, v in state_dict.items()}


def check_adapter_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise unless ``state_dict`` holds exactly ``model``'s adapter tensors, shapes included."""
    expected = adapter_parameter_names(model)
    if not expected:
        raise AdapterStateError(
            f"{type(model).__name__} has no adapters to load into; call apply_adapters first"
        )
    expected_set = set(expected)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected_set]
    if missing or unexpected:
        raise AdapterStateKeyError(key_mismatch_message(missing, unexpected))
    shapes = [
        f"  {name}: checkpoint {tuple(state_dict[name].shape)}, model "
        f"{tuple(model.get_parameter(name).shape)}"
        for name in expected
        if state_dict[name].shape != model.get_parameter(name).shape
    ]
    if shapes:
        raise AdapterStateError(
            "adapter tensor shapes differ (was the checkpoint made with another rank or "
            "base model?):\n" + "\n".join(shapes[:_SHOWN]) + _more(shapes)
        )
    check_adapter_values(state_dict, "the state dict")
    merged = [name for name, module in adapter_modules(model) if is_merged(module)]
    if merged:
        raise AdapterStateError(
            f"cannot load into merged adapters ({', '.join(merged[:3])}{_more(merged, 3)}): "
            "call unmerge_adapters(model) first"
        )


def check_adapter_values(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise unless every tensor is floating point and finite: copied into an adapter, an
    integer or bool tensor would silently become its float value (often zeros), a NaN or
    inf would poison every output.

    Raises:
        AdapterStateError: naming the tensors and what is wrong with them.
    """
    problems = []
    for name, tensor in tensors.items():
        if not torch.is_floating_point(tensor):
            problems.append(f"{name} is {tensor.dtype}, not a floating-point tensor")
        elif not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            problems.append(f"{name} holds {bad} NaN or infinite values")
    if problems:
        raise AdapterStateError(
            f"{source} holds adapter tensors that cannot be loaded (a damaged file, or one "
            "saved after training diverged):\n  " + "\n  ".join(problems[:_SHOWN]) + _more(problems)
        )


def is_adapter_only(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True if ``state_dict`` holds no frozen tensor of ``model`` (an adapter-only state dict)."""
    adapter_keys = set(adapter_parameter_names(model))
    frozen_keys = set(model.state_dict(keep_vars=True)) - adapter_keys
    return bool(adapter_keys) and not any(key in frozen_keys for key in state_dict)


def key_mismatch_message(missing: list[str], unexpected: list[str]) -> str:
    lines = ["adapter state dict does not fit the model's adapters:"]
    if missing:
        lines.append(
            f"  missing from the state dict ({len(missing)}): "
            f"{', '.join(missing[:_SHOWN])}{_more(missing)}"
        )
    if unexpected:
        lines.append(
            f"  not adapters of this model ({len(unexpected)}): "
            f"{', '.join(unexpected[:_SHOWN])}{_more(unexpected)}"
        )
    lines.append(
        "Attach the same adapter config (target_modules, method) that the state dict was saved "
        "with; a full model state dict belongs in model.load_state_dict instead."
    )
    return "\n".join(lines)


def _more(items: list[str], shown: int = _SHOWN) -> str:
    return f", ... (+{len(items) - shown} more)" if len(items) > shown else ""
