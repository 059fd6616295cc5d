"""Where the bytes of a fine-tuning run go, per parameter, as in the QLoRA paper's table."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lightning_peft.quantization.layers import real_numel
from lightning_peft.quantization.storage import is_quantized, storage_of

COMPONENTS = ("quantized weights", "float weights", "adapters", "gradients", "optimizer state")


@dataclass(frozen=True)
class MemoryReport:
    """Bytes per component of a model (and optimizer), and bits per base parameter.

    Attributes:
        bytes: bytes per component: quantized weights (codes and quantization constants),
            frozen float weights, adapters (trainable tensors), their gradients, optimizer state.
        base_parameters: frozen parameters, a 4-bit weight counted as the weights it encodes.
        quantized_parameters: how many of them are stored quantized.
    """

    bytes: dict[str, int]
    base_parameters: int
    quantized_parameters: int

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def bits_per_parameter(self, component: str | None = None) -> float:
        """Bits of ``component`` (default: all) per base parameter (the paper's unit)."""
        size = self.total_bytes if component is None else self.bytes[component]
        return 8 * size / self.base_parameters if self.base_parameters else 0.0

    @property
    def quantized_bits_per_parameter(self) -> float:
        """Bits per quantized weight, constants included: 4.127 for NF4 with double quant."""
        if not self.quantized_parameters:
            return 0.0
        return 8 * self.bytes["quantized weights"] / self.quantized_parameters

    def table(self) -> str:
        """A markdown table: component, MiB, bits per base parameter."""
        lines = ["| component | MiB | bits/param |", "|---|---:|---:|"]
        for component in COMPONENTS:
            lines.append(
                f"| {component} | {self.bytes[component] / 2**20:.3f} | "
                f"{self.bits_per_parameter(component):.3f} |"
            )
        lines.append(
            f"| **total** | {self.total_bytes / 2**20:.3f} | {self.bits_per_parameter():.3f} |"
        )
        return "\n".join(lines)


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """Measure where the training state of ``model`` (and ``optimizer``) lives.

    Gradients are counted at the size of the trainable tensors (what backward allocates);
    optimizer state is what ``optimizer.state`` holds now, so measure after a step.
    """
    sizes = dict.fromkeys(COMPONENTS, 0)
    base_parameters = quantized_parameters = 0
    quantized_ids: set[int] = set()
    seen_storage: set[int] = set()
    for module in model.modules():
        if is_quantized(module):
            sizes["quantized weights"] += _quantized_weight_bytes(module, seen_storage)
            quantized_parameters += real_numel(module.weight)
            quantized_ids.add(id(module.weight))
    for param in model.parameters():
        nbytes = param.numel() * param.element_size()
        if param.requires_grad:
            sizes["adapters"] += nbytes
            sizes["gradients"] += nbytes
            continue
        base_parameters += real_numel(param)
        if id(param) not in quantized_ids:
            sizes["float weights"] += nbytes
    if optimizer is not None:
        sizes["optimizer state"] = sum(
            value.numel() * value.element_size()
            for state in optimizer.state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor)
        )
    return MemoryReport(sizes, base_parameters, quantized_parameters)


def _quantized_weight_bytes(layer: nn.Module, seen: set[int]) -> int:
    """Bytes the layer's weight takes in memory: its codes and their constants, each storage
    counted once across layers (``seen``: the 4-bit lookup tables are shared, see
    :func:`lightning_peft.quantization.share_lookup_tables_`)."""
    total = 0
    for tensor in storage_of(layer).weight_tensors(layer):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total
