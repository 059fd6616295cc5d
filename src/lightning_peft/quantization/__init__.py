"""How the frozen base is stored: one backend per layer kind (float, Conv1D, NF4/FP4, int8
through bitsandbytes), read densely for merges, and the optimizers (8-bit, paged) that keep
adapter training small."""

from lightning_peft.quantization.inference import (
    cpu_inference_layout_available,
    pack_for_cpu_inference_,
    standard_layout,
    unpack_from_cpu_inference_,
)
from lightning_peft.quantization.layers import (
    CONV_TYPES,
    QuantMode,
    is_linear_layer,
    keep_4bit_storage_exact_,
    linear_layer_types,
    output_head_names,
    quantize_linear,
    real_numel,
    share_lookup_tables_,
    write_weight_,
)
from lightning_peft.quantization.memory import MemoryReport, memory_report
from lightning_peft.quantization.model import (
    dequantize_model,
    keep_norms_in_float32_,
    quantize_model,
)
from lightning_peft.quantization.optimizers import (
    OPTIMIZER_NAMES,
    OptimizerName,
    optimizer_class,
    rebind_schedulers,
    rebuild_optimizer,
    why_not_rebuilt,
)
from lightning_peft.quantization.storage import (
    QUANT_MODES,
    Storage,
    dense_weight,
    in_out_features,
    is_quantized,
    quant_state_tensors,
    storage_of,
)

__all__ = [
    "CONV_TYPES",
    "OPTIMIZER_NAMES",
    "QUANT_MODES",
    "MemoryReport",
    "OptimizerName",
    "QuantMode",
    "Storage",
    "cpu_inference_layout_available",
    "dense_weight",
    "dequantize_model",
    "in_out_features",
    "is_linear_layer",
    "is_quantized",
    "keep_4bit_storage_exact_",
    "keep_norms_in_float32_",
    "linear_layer_types",
    "memory_report",
    "optimizer_class",
    "output_head_names",
    "pack_for_cpu_inference_",
    "quant_state_tensors",
    "quantize_linear",
    "quantize_model",
    "real_numel",
    "rebind_schedulers",
    "rebuild_optimizer",
    "share_lookup_tables_",
    "standard_layout",
    "storage_of",
    "unpack_from_cpu_inference_",
    "why_not_rebuilt",
    "write_weight_",
]
