"""What an adapter checkpoint records besides tensors, and the checks made when it is read.

Everything here is a primitive (str, int, float, list, dict) or a tensor, so the file loads
with ``torch.load(weights_only=True)``: reading a checkpoint never runs code from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from importlib import metadata as importlib_metadata
from typing import Any

import torch
from torch import nn

from lightning_peft.adapters.registry import method_class, registered_methods
from lightning_peft.checkpoint.state import key_mismatch_message
from lightning_peft.errors import AdapterStateError, AdapterStateKeyError
from lightning_peft.injection import (
    adapter_configs_attached,
    adapter_parameter_names,
    adapter_parameters,
)

METADATA_KEY = "lightning_peft"
FORMAT_VERSION = 1
_SAMPLES_PER_TENSOR = 4096  # values hashed per frozen tensor: enough to tell bases apart, cheap
_PACKAGES = ("lightning_peft", "torch", "lightning", "transformers", "bitsandbytes")


def fingerprint_frozen(model: nn.Module, float_dtype: torch.dtype | None = None) -> str:
    """A hash of the frozen tensors of ``model``: names, shapes, dtypes and sampled values.

    Two bases with different weights (another checkpoint, another seed, another model)
    get different fingerprints; the same base quantized the same way gets the same one.
    4-bit weights contribute their quantization constants too (absmax), which
    ``DistributedDataParallel``'s broadcast does not copy. Sharded (DTensor) weights are
    gathered first, so every rank and a single process agree. Hashing a strided sample
    rather than every byte keeps this fast on large models.

    ``float_dtype``: hash floating-point tensors as if cast to it (the dtype a checkpoint's
    base had, :func:`frozen_float_dtype`): a base that Lightning's ``"bf16-true"`` /
    ``"16-true"`` casts only after the checkpoint is checked gets the fingerprint it will have.
    """
    digest = hashlib.sha256()
    named = [*model.named_parameters(), *model.named_buffers()]
    # Adapter tensors by identity, not by requires_grad (an inactive adapter is frozen too)
    # nor by name (a nested wrapper's tensors are named through its parent's base_layer).
    adapters = {id(tensor) for tensor in adapter_parameters(model).values()}
    for name, tensor in sorted(named, key=lambda item: item[0]):
        if tensor.requires_grad or id(tensor) in adapters:
            continue
        if float_dtype is not None and tensor.is_floating_point():
            tensor = tensor.detach().to(float_dtype)
        _hash_sample(digest, name, tensor)
        quant_state = getattr(tensor, "quant_state", None)
        if quant_state is not None:
            for key, value in sorted(quant_state.as_dict(packed=True).items()):
                if isinstance(value, torch.Tensor):
                    _hash_sample(digest, f"{name}.{key}", value)
    return digest.hexdigest()


def frozen_float_dtype(model: nn.Module) -> str | None:
    """The one 16-bit dtype of ``model``'s frozen floating-point tensors (a base cast whole by
    ``"bf16-true"`` or ``"16-true"``), or None when they are 32-bit or mixed."""
    adapters = {id(tensor) for tensor in adapter_parameters(model).values()}
    dtypes = {
        tensor.dtype
        for tensor in [*model.parameters(), *model.buffers()]
        if tensor.is_floating_point() and not tensor.requires_grad and id(tensor) not in adapters
    }
    if len(dtypes) == 1 and next(iter(dtypes)) in (torch.bfloat16, torch.float16):
        return str(next(iter(dtypes))).removeprefix("torch.")
    return None


def _hash_sample(digest: Any, name: str, tensor: torch.Tensor) -> None:
    if hasattr(tensor, "full_tensor"):  # a DTensor shard (FSDP2): hash the whole tensor
        tensor = tensor.full_tensor()
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
    sample = flat[::step][:_SAMPLES_PER_TENSOR].to("cpu").contiguous()
    digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    digest.update(sample.view(torch.uint8).numpy().tobytes())


def adapter_configs(model: nn.Module) -> list[dict[str, Any]]:
    """The configs of the adapters attached to ``model``, as plain dicts (one per config)."""
    return [
        {"method": type(config).__name__, "name": name, **_plain_fields(config)}
        for name, config in adapter_configs_attached(model)
    ]


def config_from_metadata(entry: dict[str, Any]) -> Any:
    """An adapter config rebuilt from a checkpoint's metadata entry (see :func:`adapter_configs`).

    Only registered methods are built (``lightning_peft.adapters.register_method``): reading
    a checkpoint never calls anything else it names.

    Raises:
        AdapterStateError: the entry names a method that is not registered.
    """
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()}
    method = method_class(fields.pop("method", None))
    if method is None:
        raise AdapterStateError(
            f"the checkpoint's adapter entry names method {entry.get('method')!r}, which is "
            f"not registered (registered: {registered_methods()}); import the module that "
            "defines and registers it first"
        )
    fields.pop("name", None)
    return method(**fields)


def _plain_fields(config: Any) -> dict[str, Any]:
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }


def package_versions() -> dict[str, str]:
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = importlib_metadata.version(package.replace("_", "-"))
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def build_metadata(
    model: nn.Module, adapter_keys: list[str], optimizer_param_names: list[list[str]]
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "adapter_keys": list(adapter_keys),
        "adapters": adapter_configs(model),
        "optimizer_param_names": optimizer_param_names,
        "base_fingerprint": fingerprint_frozen(model),
        # A base cast whole to 16 bit is checked, on resume, before Lightning casts it again.
        "base_float_dtype": frozen_float_dtype(model),
        "versions": package_versions(),
    }


def read_metadata(checkpoint: dict[str, Any], source: str = "the checkpoint") -> dict[str, Any]:
    """The metadata of an adapter checkpoint.

    Raises:
        AdapterStateError: ``checkpoint`` was not written by lightning_peft, or by a newer one.
    """
    metadata = checkpoint.get(METADATA_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(metadata, dict):
        raise AdapterStateError(
            f"{source} is not a lightning_peft adapter checkpoint (it has no {METADATA_KEY!r} "
            "entry). Resume from a file written while PeftCallback, PeftMixin or "
            "AdapterCheckpoint was active; to start from a base model's weights, load them into "
            "the model before calling fit."
        )
    version = metadata.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterStateError(
            f"{source} has adapter-checkpoint format {version!r}; this lightning_peft reads "
            f"format {FORMAT_VERSION} and older. Upgrade lightning_peft to read it."
        )
    missing = [key for key, kind in _REQUIRED.items() if not isinstance(metadata.get(key), kind)]
    if missing:
        raise AdapterStateError(
            f"{source} has damaged adapter metadata: {', '.join(missing)} missing or of the "
            "wrong type. Resume from another checkpoint, one written by AdapterCheckpoint, "
            "PeftCallback or PeftMixin and not edited since."
        )
    return metadata


# What every reader of the metadata relies on, and its type.
_REQUIRED: dict[str, type] = {
    "adapter_keys": list,
    "adapters": list,
    "optimizer_param_names": list,
    "base_fingerprint": str,
}


def check_base_fingerprint(metadata: dict[str, Any], model: nn.Module, source: str) -> None:
    """Refuse a checkpoint whose frozen base differs from ``model``'s.

    Other adapters (other target modules) change which tensors the fingerprint sees as
    frozen, so they are compared first and named as what differs.
    """
    saved_keys = metadata.get("adapter_keys")
    current_keys = adapter_parameter_names(model)
    if isinstance(saved_keys, list) and sorted(saved_keys) != sorted(current_keys):
        missing = [k for k in current_keys if k not in set(saved_keys)]
        unexpected = [k for k in saved_keys if k not in set(current_keys)]
        raise AdapterStateKeyError(f"{source}: " + key_mismatch_message(missing, unexpected))
    cast = metadata.get("base_float_dtype")
    float_dtype = getattr(torch, cast) if cast in ("bfloat16", "float16") else None
    current = fingerprint_frozen(model, float_dtype)
    if metadata["base_fingerprint"] != current:
        raise AdapterStateError(
            f"{source} was trained on a different base model: its frozen weights have fingerprint "
            f"{metadata['base_fingerprint'][:12]}..., this model's have {current[:12]}.... "
            "Load the "
            "same base weights (and quantization) the adapters were trained on."
        )


def check_optimizer_names(saved: list[list[str]], current: list[list[str]], source: str) -> None:
    """Refuse optimizer state whose parameters, matched by position, would be other tensors."""
    if saved == current:
        return
    if len(saved) != len(current):
        detail = f"it has {len(saved)} optimizer(s), the run has {len(current)}"
    else:
        index = next(i for i, (a, b) in enumerate(zip(saved, current, strict=True)) if a != b)
        a, b = saved[index], current[index]
        position = next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )
        detail = (
            f"optimizer {index} has {len(a)} parameters in the checkpoint and {len(b)} now; "
            f"at position {position} the checkpoint has "
            f"{a[position] if position < len(a) else '(none)'!r}, "
            f"the run has {b[position] if position < len(b) else '(none)'!r}"
        )
    raise AdapterStateError(
        f"{source} holds optimizer state for other parameters ({detail}). Optimizer state is "
        "matched by position: build the optimizer from the same adapters, in the same order."
    )
