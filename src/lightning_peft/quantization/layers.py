"""The base layers adapters wrap, and the 4-bit layers' care: which layers are linear, which
are heads, bitsandbytes' CPU repacking kept off, lookup tables shared, quantizing a layer.

How each kind of layer stores its weight (float, transposed ``Conv1D``, NF4/FP4, int8) is
its backend in ``storage.py``; adapters read the weight through :func:`dense_weight` in
``nn.Linear`` orientation (``(out_features, in_features)``) and hand a new one back to
:func:`write_weight_` when merging. bitsandbytes is imported lazily (about 2.5 s), and only
when a layer could be one of its types.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from lightning_peft.quantization.storage import (
    BACKENDS,
    QuantOptions,
    backend_for_mode,
    dense_weight,
    is_quantized,
    loaded_class,
    storage_of,
    unpack_layer_,
)

QuantMode = Literal["nf4", "fp4", "int8"]  # the modes of storage.BACKENDS, for type checkers


def _conv1d_class() -> type | None:
    return loaded_class("transformers.pytorch_utils", "Conv1D")


def _linear4bit_class() -> type | None:
    return loaded_class("bitsandbytes", "nn", "Linear4bit")


def linear_layer_types() -> tuple[type, ...]:
    """The layer types an adapter can wrap: ``nn.Linear``, HF ``Conv1D``, bnb 4-bit and 8-bit."""
    optional = (backend.layer_class() for backend in BACKENDS)
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
    linear4bit: Any = _linear4bit_class()
    if linear4bit is None:
        return 0
    count = 0
    for module in model.modules():
        if not isinstance(module, linear4bit):
            continue
        count += 1
        module.support_avx512bf16_for_cpu = False
        unpack_layer_(module)  # exactly, and unguarded, if repacked for inference on purpose
    return count


def share_lookup_tables_(model: nn.Module) -> int:
    """Make the 4-bit layers of ``model`` share one copy of each identical lookup table (the
    16 NF4/FP4 values, the 256 values of double quantization's dynamic map), in place.

    bitsandbytes gives every layer its own copy: about 1 KiB a layer, 0.02 bits per weight on
    a 135M model, for constants. Tables are read-only, so sharing changes no result. Returns
    how many copies were dropped.
    """
    linear4bit: Any = _linear4bit_class()
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
            if state is None or not isinstance(table, torch.Tensor):
                continue
            key = (table.device, table.dtype, tuple(table.shape), table.cpu().numpy().tobytes())
            shared = tables.setdefault(key, table)
            if shared is not table:
                state.code = shared
                dropped += 1
    return dropped


@torch.no_grad()
def write_weight_(layer: nn.Module, weight: torch.Tensor) -> float:
    """Store ``weight`` (``(out, in)``, float) into ``layer`` in the layer's own format.

    A quantized layer is re-quantized with its own settings (quant type, blocksize, double
    quantization, storage dtype). Returns the largest absolute error the storage introduced,
    ``max |stored - weight|``: 0 for a float layer of the same dtype, the rounding error of
    the 4-bit or 8-bit code otherwise.
    """
    storage_of(layer).write_(layer, weight)
    return float((dense_weight(layer).float() - weight.float()).abs().max())


def real_numel(param: Any) -> int:
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
    backend = backend_for_mode(mode)  # refuses an unknown mode by name
    if not is_linear_layer(layer) or is_quantized(layer):
        raise TypeError(
            f"quantize_linear needs a float nn.Linear or Conv1D, got {type(layer).__name__}"
        )
    device = dense_weight(layer).device
    options = QuantOptions(compute_dtype, double_quant, blocksize, quant_storage)
    quantized = backend.quantize(layer, mode, options)
    bias: Any = layer.bias
    if bias is not None:
        quantized.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    keep_4bit_storage_exact_(quantized)
    return quantized.to(device)
