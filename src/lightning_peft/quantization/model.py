"""Quantize or dense_weight every linear layer of a model in place."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from lightning_peft._compat import keep_in_fp32_modules
from lightning_peft.protocol import is_adapter
from lightning_peft.quantization.layers import (
    QuantMode,
    is_linear_layer,
    output_head_names,
    quantize_linear,
    share_lookup_tables_,
)
from lightning_peft.quantization.loftq import loftq_layer
from lightning_peft.quantization.storage import (
    FourBitStorage,
    dense_weight,
    in_out_features,
    is_quantized,
)

FOUR_BIT_MODES = FourBitStorage.modes


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
    adapters: Any = None,
    adapter_name: str = "default",
    train_head: bool = True,
) -> nn.Module:
    """Replace every float linear layer of ``model`` by a frozen bitsandbytes one, in place.

    The output head (HF ``get_output_embeddings()``, else the last linear layer) stays in
    float, as do embeddings, convolutions and norms (they are not linear layers), as in the
    QLoRA recipe, and a task class's new head (``classifier``, ``score``), which trains whole.

    Args:
        mode: ``"nf4"``, ``"fp4"`` or ``"int8"``.
        skip_modules: module-name suffixes to leave in float as well (``["mlp.down_proj"]``).
        compute_dtype: dtype of the 4-bit matmul (default: the weight's dtype).
        double_quant: quantize the absmax constants too (QLoRA's double quantization).
        blocksize: weights per absmax constant (QLoRA: 64).
        quant_storage: storage dtype of packed 4-bit codes (``torch.float32`` for FSDP1).
        device: quantize on this device (layer by layer, so the float weights never all sit
            there at once); default: where each layer is.
        adapters: adapter configs to attach right after, as ``apply_adapters(model,
            adapters, name=adapter_name)`` does. Needed for ``LoRA(init="loftq")``, whose
            initial values come from the float weights together with their 4-bit base; if
            anything fails, the model is left as it was.
        train_head: with ``adapters``, train a task class's new head too (see
            :func:`~lightning_peft.apply_adapters`).

    Returns:
        ``model``, for chaining.

    Raises:
        ValueError: adapters are already attached (quantize first: the adapters' own layers
            must stay in float), or nothing was left to quantize.
        AdapterConfigError: LoftQ asked of an int8 base or of a layer kept in float.
    """
    from lightning_peft.injection import (
        apply_adapters,
        as_config_list,
        transformers_model_prefix,
    )
    from lightning_peft.undo import restored_on_error

    if isinstance(skip_modules, str):  # one name, not its characters
        skip_modules = (skip_modules,)
    modules = dict(model.named_modules())
    if any(is_adapter(module) for module in modules.values()):
        raise ValueError(
            f"{type(model).__name__} already has adapters: quantize the base before attaching "
            "them, so the adapters' own layers stay trainable floats"
        )
    # nn.MultiheadAttention multiplies by out_proj.weight itself: it must stay a float tensor.
    attention = [n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)]
    # transformers keeps these float under its own 4-bit loading: T5's ``wo``, whose caller
    # casts its input to the weight's dtype (a uint8 cast would cut the backward off).
    keep_float = {k for m in modules.values() for k in keep_in_fp32_modules(m)}
    skipped = output_head_names(modules) | {
        name
        for name in modules
        if any(name == s or name.endswith("." + s) for s in skip_modules)
        or any(name.startswith(a + ".") for a in attention)
        or keep_float & set(name.split("."))
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
    del modules  # no reference to a replaced float layer outlives its turn in the loop
    configs = [c for c in as_config_list(adapters) if c is not None]
    loftq = loftq_targets(model, configs, mode, set(targets))
    options: dict[str, Any] = dict(
        compute_dtype=compute_dtype,
        double_quant=double_quant,
        blocksize=blocksize,
        quant_storage=quant_storage,
    )
    presets: dict[str, tuple[torch.Tensor, ...]] = {}
    prefix = transformers_model_prefix(model)
    with restored_on_error(model):
        for name in targets:
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = getattr(parent, child_name)
            if device is not None:  # a copy: the original stays (for a rollback) where it was
                layer = copy.deepcopy(layer).to(device)
            if name in loftq:
                config = loftq[name]
                quantized, lora_a, lora_b = loftq_layer(
                    layer,
                    config.rank,
                    config.scaling,
                    iterations=config.loftq_iterations,
                    mode=mode,
                    **options,
                )
                presets[name.removeprefix(prefix)] = (lora_a, lora_b)
            else:
                quantized = quantize_linear(layer, mode, **options)
            setattr(parent, child_name, quantized)
        if mode in FOUR_BIT_MODES:
            share_lookup_tables_(model)
            # Hugging Face PEFT and transformers read this flag to dispatch 4-bit code paths.
            cast(Any, model).is_loaded_in_4bit = True
        if configs:
            from lightning_peft.adapters.init import preset_values

            with preset_values(presets):
                apply_adapters(model, configs, name=adapter_name, train_head=train_head)
    return model


def loftq_targets(
    model: nn.Module, configs: Sequence[Any], mode: str, quantizable: set[str]
) -> dict[str, Any]:
    """The layers each ``LoRA(init="loftq")`` of ``configs`` targets, with its config.

    Raises:
        AdapterConfigError: LoftQ with an int8 base, or on a layer that stays in float.
    """
    from lightning_peft.adapters.lora import LoRA  # here: lora.py imports this package
    from lightning_peft.errors import AdapterConfigError
    from lightning_peft.targeting import find_targets

    chosen: dict[str, Any] = {}
    for config in configs:
        if not (isinstance(config, LoRA) and config.init == "loftq"):
            continue
        if mode not in FOUR_BIT_MODES:
            raise AdapterConfigError(
                f"LoRA(init='loftq') needs a 4-bit base ('nf4' or 'fp4'), got {mode!r}"
            )
        names = find_targets(
            model,
            config.target_modules,
            config.exclude_modules,
            can_wrap=config.can_wrap,
            method="LoRA",
        )
        kept = sorted(set(names) - quantizable)
        if kept:
            raise AdapterConfigError(
                f"LoRA(init='loftq') targets {', '.join(kept)}, which stays in float (the output "
                "head or skip_modules): LoftQ fits a 4-bit base's error; exclude it "
                "(exclude_modules=[...]) or use another init"
            )
        too_small = [n for n in names if min(in_out_features(model.get_submodule(n))) < config.rank]
        if too_small:
            raise AdapterConfigError(
                f"LoRA(init='loftq', rank={config.rank}) needs layers of at least that many "
                f"inputs and outputs; {', '.join(too_small[:3])} has fewer: lower the rank or "
                "exclude them"
            )
        chosen.update(dict.fromkeys(names, config))
    return chosen


def is_norm_layer(module: nn.Module) -> bool:
    """LayerNorm, GroupNorm, RMSNorm and the transformers norms (``LlamaRMSNorm``, ``T5LayerNorm``,
    ...): the modules whose class name says they normalize."""
    return "norm" in type(module).__name__.lower()


def keep_norms_in_float32_(model: nn.Module) -> int:
    """Store 16-bit norm parameters of ``model`` in float32, in place; returns how many.

    Under a 4-bit base with 16-bit compute the norms are the only frozen float layers in
    the residual stream; in bfloat16 their 8-bit mantissa rounds the scale of every hidden
    state. PEFT's ``prepare_model_for_kbit_training`` keeps them in float32 for the same
    reason. The values do not change (16-bit to float32 is exact), only their precision
    from here on: outputs of a float32 norm stay float32 until the next quantized matmul
    casts them to its compute dtype.
    """
    count = 0
    for module in model.modules():
        if not is_norm_layer(module):
            continue
        for param in module.parameters(recurse=False):
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
                count += 1
    return count


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every bitsandbytes layer of ``model`` by an ``nn.Linear`` of ``dtype``, in place.

    Adapters stay attached (their base layer is replaced under them). Returns ``model``.
    """
    for name, module in list(model.named_modules()):
        if not name or not is_quantized(module):
            continue
        in_features, out_features = in_out_features(module)
        weight = dense_weight(module).to(dtype)
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
        cast(Any, model).is_loaded_in_4bit = False
    return model


def quantize_like_(model: nn.Module, state_dict: dict[str, Any]) -> bool:
    """Quantize the linear layers of ``model`` that ``state_dict`` holds in 4 bit, so that
    it loads: a full state dict of the same model quantized (and adapted) elsewhere, such as
    the one Lightning's ``ddp_spawn`` hands back from its workers. Returns whether it did.

    bitsandbytes writes ``<layer>.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``)
    beside each packed weight; loading then restores blocksize, double quantization and
    constants, so only the kind must match here. Layers inside adapter wrappers are named
    through their ``base_layer``.

    Raises:
        ValueError: the state dict mixes NF4 and FP4 layers.
    """
    layers: dict[str, str] = {}
    for key in state_dict:
        for mode in ("nf4", "fp4"):
            suffix = f".weight.quant_state.bitsandbytes__{mode}"
            if key.endswith(suffix):
                layers[key.removesuffix(suffix).replace(".base_layer", "")] = mode
    if not layers:
        return False
    modes = set(layers.values())
    if len(modes) > 1:
        raise ValueError(f"the state dict holds both NF4 and FP4 layers ({sorted(modes)})")
    floats = {
        name
        for name, module in model.named_modules()
        if name and is_linear_layer(module) and not is_quantized(module)
    }
    if not floats & set(layers):  # quantized already (or other names): nothing to match
        return False
    quantize_model(model, cast(QuantMode, modes.pop()), skip_modules=sorted(floats - set(layers)))
    return True


def base_quantization(model: nn.Module) -> dict[str, Any] | None:
    """How ``model``'s frozen linear layers are stored, as a record an adapter folder keeps
    (an adapter trained over an NF4 base computes what it learned only over that base):
    ``{"mode": "nf4", "double_quant": True, "blocksize": 64, "skip_modules": [...]}``
    (``skip_modules``: the linear layers left in float, output head included), or None for
    a float base. Adapters' own layers are not the base's and are left out."""
    adapters = [name for name, module in model.named_modules() if is_adapter(module)]
    record: dict[str, Any] | None = None
    floats = []
    for name, module in model.named_modules():
        if not name or not is_linear_layer(module):
            continue
        inside = next((a for a in adapters if name.startswith(a + ".")), None)
        if inside is not None and name != f"{inside}.base_layer":
            continue  # an adapter's own layer (LoRA's A and B)
        layer_name = inside if inside is not None else name
        if not is_quantized(module):
            floats.append(layer_name)
            continue
        if record is None:
            quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
            record = (
                {"mode": "int8"}
                if quant_state is None
                else {
                    "mode": str(quant_state.quant_type),
                    "double_quant": bool(quant_state.nested),
                    "blocksize": int(quant_state.blocksize),
                }
            )
    if record is not None:
        record["skip_modules"] = floats
    return record
