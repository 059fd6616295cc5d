"""Training memory of a model size before any weight is loaded: the QLoRA paper's arithmetic.

Per base parameter (Dettmers et al. 2023, §2 and Figure 1), activations left out:

    full fine-tune   16-bit weight + 16-bit gradient + 32-bit Adam m and v     = 96 bits
    LoRA             16-bit frozen weight + adapters                          ≈ 17 bits
    QLoRA            4-bit NF4 weight + 0.127 bits of constants (double
                     quantization: 8-bit absmax per 64, 32-bit per 256) + adapters ≈ 5.3 bits

Adapters are a small fraction of the parameters (default 1.2%: LoRA r=64 on every linear
layer of LLaMA-65B), each with a 16-bit weight, a 16-bit gradient and 32-bit Adam state.
So a 70B model needs about 840 GB to fine-tune fully, 150 GB with LoRA and 46 GB with QLoRA.

Given the model's architecture (:class:`Architecture`, from its ``config.json``) and a batch
shape, :func:`activation_bytes` adds what a training step holds besides: per token and
decoder layer, the tensors autograd keeps for the backward pass of a frozen base with
adapters on every linear layer (about ``8·hidden + 4·intermediate`` values: norm inputs,
the adapters' inputs, attention's q/k/v/output, the MLP's gate, up and product); with
gradient checkpointing, one ``hidden`` per layer plus one layer recomputed; and for the
output, three ``vocab``-wide float32 tensors per token (the logits, the loss's saved
log-softmax and the logits' gradient), which dominate for small models with large
vocabularies. Embeddings and output head stay in float under QLoRA.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

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
        """Whether what is counted (activations only when an architecture was given) fits
        in ``gpu_gb`` GB."""
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
        counted = (
            "activations included"
            if "activations" in self.bytes
            else ("activations not included: give the model's --config, --batch and --seq-len")
        )
        if gpu_gb is not None:
            verdict = "fits" if self.fits(gpu_gb) else "does not fit"
            lines += ["", f"{verdict} in {gpu_gb:g} GB ({counted})"]
        elif "activations" not in self.bytes:
            lines += ["", counted]
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


@dataclass(frozen=True)
class Architecture:
    """The sizes of a decoder-only transformer that set its activation memory."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = True

    @classmethod
    def from_config(cls, config: Any) -> Architecture:
        """From a transformers config (or its ``config.json`` as a dict).

        Raises:
            ValueError: a field the estimate needs is missing.
        """
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        fields = {
            "hidden": get("hidden_size") or get("n_embd") or get("d_model"),
            "layers": get("num_hidden_layers") or get("n_layer"),
            "intermediate": get("intermediate_size") or get("n_inner"),
            "vocab": get("vocab_size"),
        }
        if fields["intermediate"] is None and fields["hidden"]:
            fields["intermediate"] = 4 * fields["hidden"]  # GPT-2's default
        missing = [name for name, value in fields.items() if not isinstance(value, int)]
        if missing:
            raise ValueError(f"the model config has no {', '.join(missing)}")
        sizes = {name: int(value) for name, value in fields.items() if value is not None}
        return cls(**sizes, tied_embeddings=bool(get("tie_word_embeddings", True)))

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)


def activation_bytes(
    architecture: Architecture,
    batch: int,
    seq_len: int,
    *,
    gradient_checkpointing: bool = False,
    compute_bytes: int = 4,
) -> dict[str, float]:
    """Bytes a training step of ``batch`` rows of ``seq_len`` tokens holds for the backward
    pass (see the module's docstring): ``{"activations": ..., "output logits": ...}``."""
    tokens = batch * seq_len
    a = architecture
    per_layer = 8 * a.hidden + 4 * a.intermediate
    if gradient_checkpointing:  # each layer's input, and one layer recomputed at a time
        layers = a.layers * a.hidden + per_layer
    else:
        layers = a.layers * per_layer
    return {
        "activations": tokens * layers * compute_bytes,
        "output logits": tokens * 3 * a.vocab * 4,  # float32: logits, log-softmax, gradient
    }


def estimate_memory(
    num_params: float | str,
    method: Method = "qlora",
    *,
    adapter_fraction: float = 0.012,
    optimizer: str = "adamw",
    architecture: Architecture | None = None,
    batch: int = 1,
    seq_len: int = 0,
    gradient_checkpointing: bool = False,
    compute_bytes: int = 2,
) -> MemoryEstimate:
    """Bytes of weights, gradients, optimizer state and adapters to fine-tune a model.

    Args:
        num_params: the model's parameter count: ``70e9`` or ``"70B"``.
        method: ``"full"``, ``"lora"`` (16-bit frozen base) or ``"qlora"`` (NF4 base with
            double quantization).
        adapter_fraction: trainable adapter parameters per base parameter (LoRA, QLoRA).
        optimizer: ``"adamw"`` (two 32-bit states), ``"adamw_8bit"`` or ``"sgd"``.
        architecture: the model's sizes: adds activations for ``batch`` rows of
            ``seq_len`` tokens (``gradient_checkpointing`` or not), and keeps embeddings and
            output head at ``compute_bytes`` (2: bf16 on a GPU; 4: float32 on a CPU).

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
    if architecture is not None:
        if seq_len < 1 or batch < 1:
            problems.append(f"batch and seq_len must be positive, got {batch} and {seq_len}")
        if compute_bytes not in (2, 4):
            problems.append(f"compute_bytes must be 2 or 4, got {compute_bytes!r}")
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
        # Embeddings and the output head are no linear layers QLoRA quantizes.
        kept = min(n, architecture.embedding_params) if architecture and method == "qlora" else 0
        quantized = n - kept
        parts = {
            "weights": quantized * (4 if method == "qlora" else 16),
            "embeddings and output head (float)": kept * 8 * compute_bytes,
            "quantization constants": quantized * NF4_CONSTANT_BITS if method == "qlora" else 0.0,
            "adapters (weights, gradients, optimizer)": adapters * (16 + state_bits),
        }
    if architecture is not None:
        step = activation_bytes(
            architecture,
            batch,
            seq_len,
            gradient_checkpointing=gradient_checkpointing,
            compute_bytes=compute_bytes,
        )
        parts.update({name: 8 * size for name, size in step.items()})
    return MemoryEstimate(int(n), method, {k: v / 8 for k, v in parts.items()})
