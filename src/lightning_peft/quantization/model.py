"""Quantize or dequantize every linear layer of a model in place."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_peft.quantization.layers import (
    QuantMode,
    dequantize,
    in_out_features,
    is_linear_layer,
    is_quantized,
    output_head_names,
    quantize_linear,
    share_lookup_tables_,
)


def quantize_model(
    model: nn.Module,
    mode: QuantMode = "nf4",
    *,
    skip_modules: Sequence[str] = (),
    compute_dtype: torch.dtype | None = None,
    double_quant: bool = True,
    blocksize: int = 64,
    quant_storage: torch.dtype = torch.uint8,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Replace every float linear layer of ``model`` by a frozen bitsandbytes one, in place.

    The output head (HF ``get_output_embeddings()``, else the last linear layer) stays in
    float, as do embeddings and norms (they are not linear layers), as in the QLoRA recipe.

    Args:
        mode: ``"nf4"``, ``"fp4"`` or ``"int8"``.
        skip_modules: module-name suffixes to leave in float as well (``["mlp.down_proj"]``).
        compute_dtype: dtype of the 4-bit matmul (default: the weight's dtype).
        double_quant: quantize the absmax constants too (QLoRA's double quantization).
        blocksize: weights per absmax constant (QLoRA: 64).
        quant_storage: storage dtype of packed 4-bit codes (``torch.float32`` for FSDP1).
        device: quantize on this device (layer by layer, so the float weights never all sit
            there at once); default: where each layer is.

    Returns:
        ``model``, for chaining.

    Raises:
        ValueError: adapters are already attached (quantize first: the adapters' own layers
            must stay in float), or nothing was left to quantize.
    """
    if isinstance(skip_modules, str):  # one name, not its characters
        skip_modules = (skip_modules,)
    modules = dict(model.named_modules())
    if any(hasattr(module, "adapter_params") for module in modules.values()):
        raise ValueError(
            f"{type(model).__name__} already has adapters: quantize the base before attaching "
            "them, so the adapters' own layers stay trainable floats"
        )
    skipped = output_head_names(modules) | {
        name for name in modules if any(name == s or name.endswith("." + s) for s in skip_modules)
    }
    targets = [
        name
        for name, module in modules.items()
        if name and is_linear_layer(module) and not is_quantized(module) and name not in skipped
    ]
    if not targets:
        raise ValueError(
            f"no float linear layer left to quantize in {type(model).__name__} "
            f"(skipped: {sorted(skipped)})"
        )
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child_name)
        if device is not None:
            layer = layer.to(device)
        quantized = quantize_linear(
            layer,
            mode,
            compute_dtype=compute_dtype,
            double_quant=double_quant,
            blocksize=blocksize,
            quant_storage=quant_storage,
        )
        setattr(parent, child_name, quantized)
    if mode in ("nf4", "fp4"):
        share_lookup_tables_(model)
        # Hugging Face PEFT and transformers read this flag to dispatch 4-bit code paths.
        model.is_loaded_in_4bit = True
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every bitsandbytes layer of ``model`` by an ``nn.Linear`` of ``dtype``, in place.

    Adapters stay attached (their base layer is replaced under them). Returns ``model``.
    """
    for name, module in list(model.named_modules()):
        if not name or not is_quantized(module):
            continue
        in_features, out_features = in_out_features(module)
        weight = dequantize(module).to(dtype)
        linear = nn.Linear(
            in_features,
            out_features,
            bias=module.bias is not None,
            device=weight.device,
            dtype=dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        linear.requires_grad_(False)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, linear)
    if getattr(model, "is_loaded_in_4bit", False):
        model.is_loaded_in_4bit = False
    return model
