"""How a frozen base layer stores its weight: float, transposed (``Conv1D``), NF4/FP4 or int8.

Adapters never look at a base layer's storage themselves. They ask this module for the
weight in ``nn.Linear`` orientation (``(out_features, in_features)``) and hand a new one back
when merging. This is the only module that touches bitsandbytes' classes; it imports
bitsandbytes lazily (about 2.5 s), and only when a layer could be one of its types.
"""

from __future__ import annotations

import sys
from typing import Literal

import torch
from torch import nn

QuantMode = Literal["nf4", "fp4", "int8"]
QUANT_MODES: tuple[str, ...] = ("nf4", "fp4", "int8")


def _loaded_class(module_name: str, *path: str) -> type | None:
    """A class from ``module_name`` if that module is already imported, else None.

    A layer of a library's type can only exist once the library is imported, so checking
    ``sys.modules`` avoids importing transformers or bitsandbytes just to say "no".
    """
    obj = sys.modules.get(module_name)
    for name in path:
        obj = getattr(obj, name, None)
    return obj if isinstance(obj, type) else None


def _conv1d_class() -> type | None:
    return _loaded_class("transformers.pytorch_utils", "Conv1D")


def _linear4bit_class() -> type | None:
    return _loaded_class("bitsandbytes", "nn", "Linear4bit")


def _linear8bit_class() -> type | None:
    return _loaded_class("bitsandbytes", "nn", "Linear8bitLt")


def linear_layer_types() -> tuple[type, ...]:
    """The layer types an adapter can wrap: ``nn.Linear``, HF ``Conv1D``, bnb 4-bit and 8-bit."""
    optional = (_conv1d_class(), _linear4bit_class(), _linear8bit_class())
    return (nn.Linear, *(cls for cls in optional if cls is not None))


# Convolutions, which LoRA and IA3 wrap too (always float: bitsandbytes stores linear layers).
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_linear_layer(module: nn.Module) -> bool:
    return isinstance(module, linear_layer_types())


# transformers task classes whose head is new (random) at from_pretrained time.
TASK_CLASS_SUFFIXES = (
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMultipleChoice",
    "ForImageClassification",
    "ForAudioClassification",
    "ForAudioFrameClassification",
)


def task_head_names(modules: dict[str, nn.Module]) -> list[str]:
    """Names of the modules transformers task classes among ``modules`` (name -> module)
    hold beside their backbone: ``classifier`` (BERT, ViT), ``score`` (Llama),
    ``qa_outputs``. Language-model heads are not among them: they come pretrained."""
    found = []
    for name, module in modules.items():
        prefix_attr = getattr(module, "base_model_prefix", None)
        if not (type(module).__name__.endswith(TASK_CLASS_SUFFIXES) and prefix_attr):
            continue
        backbone = getattr(module, prefix_attr, None)
        prefix = f"{name}." if name else ""
        children = module.named_children()
        if not isinstance(backbone, nn.Module):  # T5's QA, CLIP's classifier: PEFT's names
            found += [prefix + n for n, _ in children if n in _HEAD_NAMES]
            continue
        found += [
            prefix + child_name
            for child_name, child in children
            if child is not backbone and any(True for _ in child.parameters())
        ]
    return found


# Hugging Face PEFT's task heads, for task classes whose backbone is not where
# base_model_prefix says (T5ForQuestionAnswering's "transformer" is not a child).
_HEAD_NAMES = ("classifier", "score", "qa_outputs", "classification_head")


def output_head_names(modules: dict[str, nn.Module]) -> set[str]:
    """Names of output heads: each HF model's output embeddings and the modules inside a
    task class's head, else the last linear layer.

    Looking inside submodules matters: in a LightningModule the HF model is a child
    (``self.model``), and its ``lm_head`` is the head.
    """
    heads: set[int] = set()
    for module in modules.values():
        get_head = getattr(module, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if isinstance(head, nn.Module):
            heads.add(id(head))
    task_heads = task_head_names(modules)
    names = {
        name
        for name, module in modules.items()
        if id(module) in heads or any(name == h or name.startswith(h + ".") for h in task_heads)
    }
    if names:
        return names
    linear_names = [name for name, module in modules.items() if is_linear_layer(module)]
    return set(linear_names[-1:])


def keep_4bit_storage_exact_(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking the 4-bit weights of ``model`` for CPU inference, in
    place; returns how many 4-bit layers ``model`` holds.

    bitsandbytes 0.50 ``Linear4bit.forward``, on a CPU with AVX512-BF16, in eval mode and
    without grad, rewrites the weight in place into a faster inference layout: double
    quantization dropped, absmax in bf16, another byte order. After that one validation pass
    the dequantized weights differ (by up to 7e-3), the training forward runs through a
    kernel without autograd, and layers with a bias fail at the next backward. A frozen QLoRA
    base must stay exactly as quantized, so every 4-bit layer this package touches keeps the
    standard layout on every machine. A layer repacked before it got here is unpacked (what
    bitsandbytes itself does before saving); the constants it rounded stay rounded.
    """
    linear4bit = _linear4bit_class()
    if linear4bit is None:
        return 0
    count = 0
    for module in model.modules():
        if not isinstance(module, linear4bit):
            continue
        count += 1
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            _unpack_for_training_(weight)
    return count


def _unpack_for_training_(weight: torch.Tensor) -> None:
    """Undo bitsandbytes' CPU inference packing of a 4-bit weight, in place."""
    import bitsandbytes.functional as bnb_functional

    weight.data, quant_state = bnb_functional._convert_weight_packed_for_cpu_inverse(
        weight.data, weight.quant_state
    )
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


def share_lookup_tables_(model: nn.Module) -> int:
    """Make the 4-bit layers of ``model`` share one copy of each identical lookup table (the
    16 NF4/FP4 values, the 256 values of double quantization's dynamic map), in place.

    bitsandbytes gives every layer its own copy: about 1 KiB a layer, 0.02 bits per weight on
    a 135M model, for constants. Tables are read-only, so sharing changes no result. Returns
    how many copies were dropped.
    """
    linear4bit = _linear4bit_class()
    if linear4bit is None:
        return 0
    tables: dict[tuple, torch.Tensor] = {}
    dropped = 0
    for module in model.modules():
        quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
        if not isinstance(module, linear4bit) or quant_state is None:
            continue
        for state in (quant_state, getattr(quant_state, "state2", None)):
            table = getattr(state, "code", None)
            if not isinstance(table, torch.Tensor):
                continue
            key = (table.device, table.dtype, tuple(table.shape), table.cpu().numpy().tobytes())
            shared = tables.setdefault(key, table)
            if shared is not table:
                state.code = shared
                dropped += 1
    return dropped


def is_quantized(layer: nn.Module) -> bool:
    """True for a layer whose weight is stored in 4 or 8 bits (not a float copy)."""
    linear4bit, linear8bit = _linear4bit_class(), _linear8bit_class()
    if linear4bit is not None and isinstance(layer, linear4bit):
        return True
    return (
        linear8bit is not None
        and isinstance(layer, linear8bit)
        and layer.weight.dtype == torch.int8
    )


def in_out_features(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of any layer in :func:`linear_layer_types`."""
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(layer, conv1d):
        return layer.nx, layer.nf
    return layer.in_features, layer.out_features


def dequantize(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a float ``(out_features, in_features)`` tensor, detached.

    For a float layer this is the weight itself (a transposed view for ``Conv1D``), not a
    copy: callers must not write into it. For a 4-bit or 8-bit layer it is a new tensor.
    """
    conv1d, linear4bit = _conv1d_class(), _linear4bit_class()
    weight = layer.weight
    if conv1d is not None and isinstance(layer, conv1d):
        return weight.detach().T
    if linear4bit is not None and isinstance(layer, linear4bit) and weight.quant_state is not None:
        import bitsandbytes.functional as bnb_functional

        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            _unpack_for_training_(weight)  # a layer nobody guarded (keep_4bit_storage_exact_)
        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    if weight.dtype == torch.int8:
        # LLM.int8: row-wise absmax scaling, W = CB * SCB / 127. After the first forward
        # bitsandbytes moves SCB from the parameter to the layer's state.
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
        return weight.data.float() * (scales.float().unsqueeze(1) / 127.0)
    return weight.detach()


@torch.no_grad()
def write_weight_(layer: nn.Module, weight: torch.Tensor) -> float:
    """Store ``weight`` (``(out, in)``, float) into ``layer`` in the layer's own format.

    A quantized layer is re-quantized with its own settings (quant type, blocksize, double
    quantization, storage dtype). Returns the largest absolute error the storage introduced,
    ``max |stored - weight|``: 0 for a float layer of the same dtype, the rounding error of
    the 4-bit or 8-bit code otherwise.
    """
    if not is_quantized(layer):
        target = dequantize(layer)  # a view of the stored weight: writing it writes the layer
        target.copy_(weight)
    elif isinstance(layer, _linear4bit_class()):
        import bitsandbytes as bnb

        old = layer.weight
        layer.weight = bnb.nn.Params4bit(
            weight.to(old.quant_state.dtype).contiguous(),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=layer,
        ).to(old.device)
    else:
        layer.weight = _int8_params(weight, layer.weight.device)
        # The layer caches the previous codes in its state after a forward pass.
        layer.state.CB, layer.state.SCB = None, None
    return float((dequantize(layer).float() - weight.float()).abs().max())


def _int8_params(weight: torch.Tensor, device: torch.device) -> nn.Parameter:
    """LLM.int8 codes of ``weight`` on ``device``.

    bitsandbytes quantizes an ``Int8Params`` only when it moves from the CPU, so the float
    weight goes through the CPU even when it and the layer live on a GPU.
    """
    import bitsandbytes as bnb

    float_weight = weight.detach().to("cpu", copy=True).contiguous()
    return bnb.nn.Int8Params(float_weight, requires_grad=False, has_fp16_weights=False).to(device)


def real_numel(param: torch.Tensor) -> int:
    """Number of parameters a tensor stands for: a packed 4-bit weight holds two per byte."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(param, "bnb_quantized", False):
        return int(quant_state.shape.numel())
    return param.numel()


def quantize_linear(
    layer: nn.Module,
    mode: QuantMode = "nf4",
    *,
    compute_dtype: torch.dtype | None = None,
    double_quant: bool = True,
    blocksize: int = 64,
    quant_storage: torch.dtype = torch.uint8,
) -> nn.Module:
    """A bitsandbytes copy of a float ``nn.Linear`` or ``Conv1D``, quantized on its device.

    ``"nf4"`` / ``"fp4"`` give a ``Linear4bit`` (QLoRA, Dettmers et al. 2023; ``double_quant``
    quantizes the absmax constants again, 4.5 -> 4.13 bits per parameter); ``"int8"`` gives an
    LLM.int8 ``Linear8bitLt`` (Dettmers et al. 2022). The result is frozen.

    Raises:
        ValueError: an unknown ``mode``.
        TypeError: a layer that is not a float linear layer.
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"quantization mode must be one of {QUANT_MODES}, got {mode!r}")
    if not is_linear_layer(layer) or is_quantized(layer):
        raise TypeError(
            f"quantize_linear needs a float nn.Linear or Conv1D, got {type(layer).__name__}"
        )
    import bitsandbytes as bnb

    weight = dequantize(layer).detach()
    in_features, out_features = in_out_features(layer)
    has_bias = getattr(layer, "bias", None) is not None
    device = weight.device
    if mode == "int8":
        quantized = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=has_bias, has_fp16_weights=False, device="meta"
        )
        quantized.weight = _int8_params(weight, device)
    else:
        quantized = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=has_bias,
            compute_dtype=compute_dtype or weight.dtype,
            compress_statistics=double_quant,
            quant_type=mode,
            quant_storage=quant_storage,
            device="meta",
        )
        quantized.weight = bnb.nn.Params4bit(
            weight.clone().contiguous(),
            requires_grad=False,
            blocksize=blocksize,
            compress_statistics=double_quant,
            quant_type=mode,
            quant_storage=quant_storage,
            module=quantized,
        )
    if has_bias:
        quantized.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    keep_4bit_storage_exact_(quantized)
    return quantized.to(device)
