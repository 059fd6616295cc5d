"""bitsandbytes' fast CPU layout for 4-bit weights, for models that only infer (a server,
an evaluation with no training ahead), with the layout training saw recoverable exactly.

On a CPU with AVX512-BF16, bitsandbytes runs a 4-bit layer from a repacked weight: codes
reordered for its kernel, absmax in bfloat16, double quantization undone, the matmul in
bfloat16. Greedy generation on an NF4 SmolLM2-135M architecture runs 1.5-1.6x faster so
(batch 1 and 8, 2 cores: ``benchmarks/generation.py``), and it is what PEFT + bitsandbytes
run in eval mode. Training layers keep the standard layout
(:func:`~lightning_peft.quantization.keep_4bit_storage_exact_`: the repacking rounds the
constants, and its kernel has no backward). Here each layer is repacked on
purpose and keeps its standard quantization state beside (its constants: 3% of the 4-bit
codes' bytes with double quantization, 12.5% without; the repacked layout's own bfloat16
constants add 6%): the codes' reordering is undone exactly, so :func:`standard_layout` gives
back the weights as trained, for a fingerprint or a new adapter. A repacked layer refuses to
train (its kernel has no backward), and ``state_dict()`` or a merge first gives it its
standard layout back, exactly, for good. Move a model to another device only after
:func:`unpack_from_cpu_inference_`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_peft._compat import pack_cpu_4bit
from lightning_peft.errors import AdapterStateError
from lightning_peft.quantization.storage import (
    PACKED_HOOKS,
    STANDARD_STATE,
    loaded_class,
    unpack_layer_,
)


def cpu_inference_layout_available() -> bool:
    """Whether bitsandbytes has its fast CPU 4-bit kernel here (a CPU with AVX512-BF16)."""
    try:
        import bitsandbytes.functional
    except ImportError:
        return False
    return bool(bitsandbytes.functional.has_avx512bf16())


def pack_for_cpu_inference_(model: nn.Module) -> int:
    """Repack the 4-bit CPU layers of ``model`` into bitsandbytes' fast inference layout, in
    place; returns how many were repacked (0 where the CPU lacks AVX512-BF16).

    Only for inference: the layers' forward has no backward afterwards. Undo with
    :func:`standard_layout` (for a while) or :func:`unpack_from_cpu_inference_`.
    """
    if not cpu_inference_layout_available():
        return 0
    return sum(_pack_layer(module) for module in _layers(model))


def _pack_layer(module: Any) -> bool:
    """Repack one 4-bit layer, keeping its standard state and guarding it; whether it was."""
    weight = module.weight
    state = weight.quant_state
    if weight.device.type != "cpu" or getattr(state, "packing_format_for_cpu", False):
        return False
    rows, columns = state.shape
    if rows % 32 or columns % state.blocksize:  # what the kernel's tiling takes
        return False
    # bitsandbytes rebinds the fields of the state it is given (no tensor is written):
    # a shallow copy leaves the original whole.
    weight.data, weight.quant_state = pack_cpu_4bit(weight.data, copy.copy(state))
    module.__dict__[STANDARD_STATE] = state
    module.__dict__[PACKED_HOOKS] = [
        module.register_forward_pre_hook(_inference_only),
        module.register_state_dict_pre_hook(_standard_before_saving),
    ]
    return True


def _inference_only(module: nn.Module, args: tuple[Any, ...]) -> None:
    x = args[0] if args else None
    if module.training or (isinstance(x, torch.Tensor) and x.requires_grad):
        raise AdapterStateError(
            "this 4-bit layer runs from bitsandbytes' CPU inference layout, whose kernel has "
            "no backward: call lightning_peft.quantization.unpack_from_cpu_inference_(model) "
            "before training (or evaluate under torch.no_grad() in eval mode)"
        )


def _standard_before_saving(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    unpack_layer_(module)  # exactly, instead of bitsandbytes' rounding unpack


def unpack_from_cpu_inference_(model: nn.Module) -> list[nn.Module]:
    """Give every layer :func:`pack_for_cpu_inference_` repacked its standard weight back,
    exactly (the codes' order and the kept quantization state); returns those layers."""
    return [m for m in _layers(model) if STANDARD_STATE in m.__dict__ and unpack_layer_(m)]


@contextmanager
def standard_layout(model: nn.Module) -> Iterator[None]:
    """Inside, ``model``'s repacked layers hold their standard weights (as trained); after,
    the ones that were repacked are repacked again, whatever happened inside."""
    restored = unpack_from_cpu_inference_(model)
    try:
        yield
    finally:
        for module in restored:
            _pack_layer(module)


def _layers(model: nn.Module) -> Iterator[Any]:
    linear4bit: Any = loaded_class("bitsandbytes", "nn", "Linear4bit")
    if linear4bit is None:
        return
    for module in model.modules():
        if isinstance(module, linear4bit) and getattr(module.weight, "quant_state", None):
            yield module
