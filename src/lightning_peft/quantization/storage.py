"""One storage backend per kind of base layer: how it holds its weight, and how to read,
write, size and make one.

Adapters and merges see every base layer through :func:`storage_of`: the weight as a dense
float ``(out_features, in_features)`` tensor, a new weight written back in the layer's own
format, and the bytes the stored weight takes. Lightning's ``mode_to_cls`` table and PEFT's
quantization backends are the models: a new kind of layer (or of quantization) is one class
here and one line in :data:`BACKENDS`; ``QUANT_MODES`` follows from the backends.

bitsandbytes and transformers are never imported here just to say "no": a layer of their
types can only exist once they are imported, so the classes are looked up in ``sys.modules``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_peft._compat import unpack_cpu_4bit


def loaded_class(module_name: str, *path: str) -> type | None:
    """A class from ``module_name`` if that module is already imported, else None."""
    obj: Any = sys.modules.get(module_name)
    for name in path:
        obj = getattr(obj, name, None)
    return obj if isinstance(obj, type) else None


@dataclass(frozen=True)
class QuantOptions:
    """bitsandbytes' settings for a new quantized layer (the 4-bit ones; int8 has none)."""

    compute_dtype: torch.dtype | None = None  # of the 4-bit matmuls (None: the weight's)
    double_quant: bool = True  # quantize the absmax constants again (QLoRA)
    blocksize: int = 64  # weights per absmax constant
    quant_storage: torch.dtype = torch.uint8  # dtype the packed codes are stored in


class Storage:
    """A base layer kind. Subclasses say which layers are theirs and how they store weights."""

    quantized = False  # the weight is held in fewer bits than the compute dtype
    modes: tuple[str, ...] = ()  # quantize_linear modes that produce this kind

    def layer_class(self) -> type | None:
        """The layer class this backend stores for (None when its library is not loaded)."""
        return nn.Linear

    def owns(self, layer: nn.Module) -> bool:
        cls = self.layer_class()
        return cls is not None and isinstance(layer, cls)

    def features(self, layer: Any) -> tuple[int, int]:
        """``(in_features, out_features)``."""
        return layer.in_features, layer.out_features

    def dense_weight(self, layer: Any) -> torch.Tensor:
        """The weight as a float ``(out, in)`` tensor, detached. For a float layer this is the
        stored weight itself (a view), not a copy: callers must not write into it."""
        return layer.weight.detach()

    def write_(self, layer: Any, weight: torch.Tensor) -> None:
        """Store a float ``(out, in)`` ``weight`` in the layer's own format, in place."""
        self.dense_weight(layer).copy_(weight)  # a view of the stored weight

    def weight_tensors(self, layer: Any) -> list[torch.Tensor]:
        """The tensors the stored weight takes in memory (codes and their constants)."""
        return [layer.weight]

    def quantize(self, layer: Any, mode: str, options: QuantOptions) -> nn.Module:
        """A new layer of this kind holding ``layer``'s weight (its bias is the caller's),
        quantized by ``mode`` with the ``options`` that apply to the kind."""
        raise NotImplementedError(f"{type(self).__name__} does not quantize")


class Conv1DStorage(Storage):
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is ``(in, out)``."""

    def layer_class(self) -> type | None:
        return loaded_class("transformers.pytorch_utils", "Conv1D")

    def features(self, layer: Any) -> tuple[int, int]:
        return layer.nx, layer.nf

    def dense_weight(self, layer: Any) -> torch.Tensor:
        return layer.weight.detach().T


class FourBitStorage(Storage):
    """bitsandbytes ``Linear4bit``: NF4 or FP4 codes in blocks of 64 with one absmax each
    (QLoRA, Dettmers et al. 2023); double quantization quantizes the absmax again."""

    quantized = True
    modes = ("nf4", "fp4")

    def layer_class(self) -> type | None:
        return loaded_class("bitsandbytes", "nn", "Linear4bit")

    def dense_weight(self, layer: Any) -> torch.Tensor:
        import bitsandbytes.functional as bnb_functional

        weight = layer.weight
        if weight.quant_state is None:  # not quantized yet (still on the meta device)
            return weight.detach()
        unpack_layer_(layer)  # if repacked: on purpose (exactly back) or by an unguarded layer
        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)

    def write_(self, layer: Any, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        old = layer.weight
        params: Any = bnb.nn.Params4bit(
            weight.to(old.quant_state.dtype).contiguous(),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=layer,
        )
        layer.weight = params.to(old.device)

    def weight_tensors(self, layer: Any) -> list[torch.Tensor]:
        return [layer.weight, *quant_state_tensors(layer.weight.quant_state)]

    def quantize(self, layer: Any, mode: str, options: QuantOptions) -> nn.Module:
        import bitsandbytes as bnb

        weight = dense_weight(layer)
        quantized = bnb.nn.Linear4bit(
            *in_out_features(layer),
            bias=layer.bias is not None,
            compute_dtype=options.compute_dtype or weight.dtype,
            compress_statistics=options.double_quant,
            quant_type=mode,
            quant_storage=options.quant_storage,
            device="meta",
        )
        quantized.weight = bnb.nn.Params4bit(
            weight.clone().contiguous(),
            requires_grad=False,
            blocksize=options.blocksize,
            compress_statistics=options.double_quant,
            quant_type=mode,
            quant_storage=options.quant_storage,
            module=quantized,
        )
        return quantized


class Int8Storage(Storage):
    """bitsandbytes ``Linear8bitLt`` holding LLM.int8 codes (Dettmers et al. 2022): row-wise
    absmax scaling, ``W = CB * SCB / 127``. (With ``has_fp16_weights`` it holds a float
    weight, and is stored as a float layer.)"""

    quantized = True
    modes = ("int8",)

    def layer_class(self) -> type | None:
        return loaded_class("bitsandbytes", "nn", "Linear8bitLt")

    def owns(self, layer: nn.Module) -> bool:
        return super().owns(layer) and layer.weight.dtype == torch.int8

    def dense_weight(self, layer: Any) -> torch.Tensor:
        return layer.weight.data.float() * (_int8_scales(layer).float().unsqueeze(1) / 127.0)

    def write_(self, layer: Any, weight: torch.Tensor) -> None:
        layer.weight = _int8_params(weight, layer.weight.device)
        # The layer caches the previous codes in its state after a forward pass.
        layer.state.CB, layer.state.SCB = None, None

    def weight_tensors(self, layer: Any) -> list[torch.Tensor]:
        return [layer.weight, _int8_scales(layer)]

    def quantize(self, layer: Any, mode: str, options: QuantOptions) -> nn.Module:
        import bitsandbytes as bnb

        quantized = bnb.nn.Linear8bitLt(
            *in_out_features(layer),
            bias=layer.bias is not None,
            has_fp16_weights=False,
            device="meta",
        )
        weight = dense_weight(layer)
        quantized.weight = _int8_params(weight, weight.device)
        return quantized


# What quantization.inference leaves on a 4-bit layer it repacks: the standard quantization
# state (the way back is exact) and the hooks that guard the packed layer.
STANDARD_STATE = "_lightning_peft_standard_quant_state"
PACKED_HOOKS = "_lightning_peft_packed_hooks"


def unpack_layer_(layer: Any) -> bool:
    """Give ``layer``'s 4-bit weight its standard layout back, in place; returns whether it
    was repacked. Exact for a layer ``pack_for_cpu_inference_`` repacked (its codes are
    reordered back and its kept state restored); for one bitsandbytes repacked by itself,
    what bitsandbytes can recover (the constants it rounded stay rounded). Any other layer,
    quantized or not yet, is left as it is: callers need not check first."""
    weight = layer.weight
    standard = layer.__dict__.pop(STANDARD_STATE, None)
    for handle in layer.__dict__.pop(PACKED_HOOKS, ()):
        handle.remove()
    quant_state = getattr(weight, "quant_state", None)
    packed = bool(getattr(quant_state, "packing_format_for_cpu", False))
    if standard is None:
        if packed:
            unpack_for_training_(weight)
        return packed
    if packed:  # bitsandbytes' own state_dict() may have unpacked it already (codes exact)
        weight.data, _ = unpack_cpu_4bit(weight.data, weight.quant_state)
    weight.quant_state = standard
    return True


def unpack_for_training_(weight: Any) -> None:
    """Undo bitsandbytes' CPU inference packing of a 4-bit weight, in place."""
    weight.data, quant_state = unpack_cpu_4bit(weight.data, weight.quant_state)
    if quant_state.absmax.dim() == 2:
        # bitsandbytes 0.50 re-lays out absmax only when it re-quantizes it (double
        # quantization); otherwise it stays (blocks per row, rows) in bf16 and dequantizing
        # would pair codes with other blocks' constants.
        quant_state.absmax = quant_state.absmax.T.reshape(-1).float().contiguous()
    weight.quant_state = quant_state


def quant_state_tensors(quant_state: object) -> list[torch.Tensor]:
    """The tensors a bitsandbytes 4-bit ``QuantState`` holds in memory: absmax, the code's
    lookup table, and with double quantization the offset and the nested state's absmax
    and table. (Its state-dict form adds a serialized description: not memory.)"""
    found = []
    for state in (quant_state, getattr(quant_state, "state2", None)):
        for name in ("absmax", "code", "offset"):
            value = getattr(state, name, None)
            if isinstance(value, torch.Tensor):
                found.append(value)
    return found


def _int8_scales(layer: Any) -> torch.Tensor:
    # After the first forward bitsandbytes moves SCB from the parameter to the layer's state.
    scales = getattr(layer.weight, "SCB", None)
    return scales if scales is not None else layer.state.SCB


def _int8_params(weight: torch.Tensor, device: torch.device) -> nn.Parameter:
    """LLM.int8 codes of ``weight`` on ``device``.

    bitsandbytes quantizes an ``Int8Params`` only when it moves from the CPU, so the float
    weight goes through the CPU even when it and the layer live on a GPU.
    """
    import bitsandbytes as bnb

    float_weight = weight.detach().to("cpu", copy=True).contiguous()
    params: Any = bnb.nn.Int8Params(float_weight, requires_grad=False, has_fp16_weights=False)
    return params.to(device)


# The first that owns a layer stores it; a float layer is the fallback (nn.Linear, an
# fp16-weight Linear8bitLt, the weight of an embedding or convolution).
BACKENDS: tuple[Storage, ...] = (Conv1DStorage(), FourBitStorage(), Int8Storage())
_FLOAT = Storage()
QUANT_MODES: tuple[str, ...] = tuple(mode for backend in BACKENDS for mode in backend.modes)


def storage_of(layer: nn.Module) -> Storage:
    """The backend that stores ``layer``'s weight."""
    return next((backend for backend in BACKENDS if backend.owns(layer)), _FLOAT)


def backend_for_mode(mode: str) -> Storage:
    """The backend ``quantize_linear(layer, mode)`` makes.

    Raises:
        ValueError: no backend has that mode.
    """
    found = next((backend for backend in BACKENDS if mode in backend.modes), None)
    if found is None:
        raise ValueError(f"quantization mode must be one of {QUANT_MODES}, got {mode!r}")
    return found


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a float ``(out_features, in_features)`` tensor, detached.

    For a float layer this is the weight itself (a transposed view for ``Conv1D``), not a
    copy: callers must not write into it. For a 4-bit or 8-bit layer it is a new tensor.
    """
    return storage_of(layer).dense_weight(layer)


def in_out_features(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of any layer in ``linear_layer_types()``."""
    return storage_of(layer).features(layer)


def is_quantized(layer: nn.Module) -> bool:
    """True for a layer whose weight is stored in 4 or 8 bits (not a float copy)."""
    return storage_of(layer).quantized
