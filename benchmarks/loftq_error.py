"""How much of NF4's error LoftQ's start removes on SmolLM2-135M's weights, by rank and
alternations: ``||W - (dense_weight(Q) + s B A)|| / ||W - dense_weight(NF4(W))||`` (Frobenius,
summed over the layers sampled). Explains the LoftQ rows of the fidelity table.

    python benchmarks/loftq_error.py        # about a minute on 2 CPU cores

Prints a table and saves it to benchmarks/results/loftq_error.md.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_peft.data import load_smollm2
from lightning_peft.quantization import dense_weight
from lightning_peft.quantization.loftq import loftq_layer

RESULTS = Path(__file__).parent / "results"
# A sample: attention and feed-forward projections of an early and a middle layer.
LAYERS = (
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.15.self_attn.q_proj",
    "model.layers.15.mlp.down_proj",
)
SCALING = 2.0  # alpha / rank of the fidelity rows; the ratio does not depend on it


def error_ratio(model: torch.nn.Module, rank: int, iterations: int) -> float:
    ours = plain = 0.0
    for name in LAYERS:
        layer = model.get_submodule(name)
        weight = layer.weight.detach().float()
        base, lora_a, lora_b = loftq_layer(layer, rank, SCALING, iterations=iterations)
        standard, _, _ = loftq_layer(layer, 1, SCALING, iterations=1)  # base = NF4(W)
        plain += (weight - dense_weight(standard).float()).norm().item() ** 2
        start = dense_weight(base).float() + SCALING * lora_b @ lora_a
        ours += (weight - start).norm().item() ** 2
    return (ours / plain) ** 0.5


def main() -> None:
    model, _ = load_smollm2()
    lines = [
        f"LoftQ on SmolLM2-135M-Instruct (NF4, double quantization), {len(LAYERS)} layers "
        "sampled: the starting weight's error as a share of plain NF4's (lower is better).",
        "",
        "| rank | 1 alternation | 3 alternations |",
        "|---:|---:|---:|",
    ]
    for rank in (8, 16, 64):
        one, three = (error_ratio(model, rank, t) for t in (1, 3))
        lines.append(f"| {rank} | {one:.3f} | {three:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "loftq_error.md").write_text(text)


if __name__ == "__main__":
    main()
