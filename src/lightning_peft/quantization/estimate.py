"""Training memory of a model size before any weight is loaded: the QLoRA paper's arithmetic.

Per base parameter (Dettmers et al. 2023, §2 and Figure 1), activations left out:

    full fine-tune   16-bit weight + 16-bit gradient + 32-bit Adam m and v     = 96 bits
    LoRA             16-bit frozen weight + adapters                          ≈ 17 bits
    QLoRA            4-bit NF4 weight + 0.127 bits of constants (double
                     quantization: 8-bit absmax per 64, 32-bit per 256) + adapters ≈ 5.3 bits

Adapters are a small fraction of the parameters (default 1.2%: LoRA r=64 on every linear
layer of LLaMA-65B), each with a 16-bit weight, a 16-bit gradient and 32-bit Adam state.
So a 70B model needs about 840 GB to fine-tune fully, 150 GB with LoRA and 46 GB with QLoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Method = Literal["full", "lora", "qlora"]
METHODS = ("full", "lora", "qlora")
NF4_CONSTANT_BITS = 8 / 64 + 32 / (64 * 256)  # 0.127: double-quantized absmax per weight
_OPTIMIZER_BITS = {"adamw": 64, "adamw_8bit": 16, "sgd": 0}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component for fine-tuning ``num_params`` parameters with ``method``."""

    num_params: int
    method: str
    bytes: dict[str, float]

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes.values())

    def bits_per_parameter(self) -> float:
        return 8 * self.total_bytes / self.num_params

    def fits(self, gpu_gb: float) -> bool:
        """Whether the weights and training state fit in ``gpu_gb`` GB (activations aside)."""
        return self.total_bytes <= gpu_gb * 1e9

    def table(self, gpu_gb: float | None = None) -> str:
        lines = [
            f"{self.method} fine-tuning of {self.num_params / 1e9:g}B parameters",
            "",
            "| component | GB | bits/param |",
            "|---|---:|---:|",
        ]
        for component, size in self.bytes.items():
            if size:
                lines.append(
                    f"| {component} | {size / 1e9:,.1f} | {8 * size / self.num_params:.3f} |"
                )
        lines.append(
            f"| **total** | **{self.total_bytes / 1e9:,.1f}** | **{self.bits_per_parameter():.2f}** |"
        )
        if gpu_gb is not None:
            verdict = "fits" if self.fits(gpu_gb) else "does not fit"
            lines += ["", f"{verdict} in {gpu_gb:g} GB (activations not included)"]
        return "\n".join(lines)


def estimate_memory(
    num_params: float,
    method: Method = "qlora",
    *,
    adapter_fraction: float = 0.012,
    optimizer: str = "adamw",
) -> MemoryEstimate:
    """Bytes of weights, gradients, optimizer state and adapters to fine-tune a model.

    Args:
        num_params: the model's parameter count (``70e9`` for a 70B model).
        method: ``"full"``, ``"lora"`` (16-bit frozen base) or ``"qlora"`` (NF4 base with
            double quantization).
        adapter_fraction: trainable adapter parameters per base parameter (LoRA, QLoRA).
        optimizer: ``"adamw"`` (two 32-bit states), ``"adamw_8bit"`` or ``"sgd"``.

    Raises:
        ValueError: an unknown method or optimizer, or a non-positive size.
    """
    problems = []
    if not num_params or num_params <= 0:
        problems.append(f"num_params must be positive, got {num_params!r}")
    if method not in METHODS:
        problems.append(f"method must be one of {METHODS}, got {method!r}")
    if optimizer not in _OPTIMIZER_BITS:
        problems.append(f"optimizer must be one of {tuple(_OPTIMIZER_BITS)}, got {optimizer!r}")
    if not 0 <= adapter_fraction < 1:
        problems.append(f"adapter_fraction must be in [0, 1), got {adapter_fraction!r}")
    if problems:
        raise ValueError("; ".join(problems))
    n = float(num_params)
    state_bits = 16 + _OPTIMIZER_BITS[optimizer]  # gradient + optimizer, per trained param
    if method == "full":
        parts = {
            "weights": n * 16,
            "gradients": n * 16,
            "optimizer state": n * _OPTIMIZER_BITS[optimizer],
        }
    else:
        adapters = n * adapter_fraction
        parts = {
            "weights": n * (4 if method == "qlora" else 16),
            "quantization constants": n * NF4_CONSTANT_BITS if method == "qlora" else 0.0,
            "adapters (weights, gradients, optimizer)": adapters * (16 + state_bits),
        }
    return MemoryEstimate(int(n), method, {k: v / 8 for k, v in parts.items()})
