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

import math
import re
from dataclasses import dataclass
from typing import Literal

Method = Literal["full", "lora", "qlora"]
METHODS: tuple[Method, ...] = ("full", "lora", "qlora")
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
            f"| **total** | **{self.total_bytes / 1e9:,.1f}** | "
            f"**{self.bits_per_parameter():.2f}** |"
        )
        if gpu_gb is not None:
            verdict = "fits" if self.fits(gpu_gb) else "does not fit"
            lines += ["", f"{verdict} in {gpu_gb:g} GB (activations not included)"]
        return "\n".join(lines)


_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kKmMbBtT]?)\s*$")
_SCALE = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_size(size: str | float) -> float:
    """A parameter count from ``70e9``, ``"70B"``, ``"7b"``, ``"135M"`` or ``"134515008"``.

    Raises:
        ValueError: not a number with an optional K/M/B/T suffix, or under one parameter.
    """
    if isinstance(size, str):
        match = _SIZE.match(size)
        if not match:
            raise ValueError(
                f"size must be a number with an optional K/M/B/T suffix (70B, 135M), got {size!r}"
            )
        count = float(match.group(1)) * _SCALE[match.group(2).lower()]
    elif isinstance(size, (int, float)) and not isinstance(size, bool):
        count = float(size)
    else:
        raise ValueError(f"size must be a number or a string such as '70B', got {size!r}")
    if not math.isfinite(count) or count < 1:
        raise ValueError(f"a model has at least one parameter, got {size!r}")
    return count


def estimate_memory(
    num_params: float | str,
    method: Method = "qlora",
    *,
    adapter_fraction: float = 0.012,
    optimizer: str = "adamw",
) -> MemoryEstimate:
    """Bytes of weights, gradients, optimizer state and adapters to fine-tune a model.

    Args:
        num_params: the model's parameter count: ``70e9`` or ``"70B"``.
        method: ``"full"``, ``"lora"`` (16-bit frozen base) or ``"qlora"`` (NF4 base with
            double quantization).
        adapter_fraction: trainable adapter parameters per base parameter (LoRA, QLoRA).
        optimizer: ``"adamw"`` (two 32-bit states), ``"adamw_8bit"`` or ``"sgd"``.

    Raises:
        ValueError: an unknown method or optimizer, or a non-positive size.
    """
    problems = []
    try:
        num_params = parse_size(num_params)
    except ValueError as error:
        problems.append(f"num_params: {error}")
    if method not in METHODS:
        problems.append(f"method must be one of {METHODS}, got {method!r}")
    if optimizer not in _OPTIMIZER_BITS:
        problems.append(f"optimizer must be one of {tuple(_OPTIMIZER_BITS)}, got {optimizer!r}")
    if not isinstance(adapter_fraction, (int, float)) or not 0 <= adapter_fraction < 1:
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
