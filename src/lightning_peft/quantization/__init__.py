"""How the frozen base is stored: NF4/FP4/int8 through bitsandbytes, dequantized for merges."""

from lightning_peft.quantization.layers import (
    QUANT_MODES,
    QuantMode,
    dequantize,
    in_out_features,
    is_linear_layer,
    is_quantized,
    linear_layer_types,
    quantize_linear,
    real_numel,
    write_weight_,
)

__all__ = [
    "QUANT_MODES",
    "QuantMode",
    "dequantize",
    "in_out_features",
    "is_linear_layer",
    "is_quantized",
    "linear_layer_types",
    "quantize_linear",
    "real_numel",
    "write_weight_",
]
