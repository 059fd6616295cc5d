"""What stacking LoRA's A matrices would save, measured before building it (issue 19).

Projections that read the same input (q, k and v; gate and up) could run their LoRA A
matmuls as one: ``x @ cat(A_q, A_k, A_v).T`` split into three, instead of three skinny
matmuls (and, in backward, one input-gradient matmul instead of three plus two adds). This
times one such group's adapter forward + backward both ways, in isolation (the base
layers' outputs are given tensors), against the same step with no adapter at all; the
"adapter cost" columns subtract that. Shapes are those of ``qlora_speed.py``'s two models.
Writes benchmarks/results/lora_stacking-cpu.md.

    python benchmarks/lora_stacking.py        # under a minute on 2 CPU cores
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from qlora_speed import cpu_name

RESULTS = Path(__file__).parent / "results"
RANK, ALPHA = 16, 32

# (model, group, rows = batch x sequence, input features, output features of each member)
GROUPS = [
    ("tiny Llama (batch 4 x 128)", "q, k, v", 512, 256, (256, 128, 128)),
    ("tiny Llama (batch 4 x 128)", "gate, up", 512, 256, (512, 512)),
    ("SmolLM2-135M (batch 2 x 128)", "q, k, v", 256, 576, (576, 192, 192)),
    ("SmolLM2-135M (batch 2 x 128)", "gate, up", 256, 576, (1536, 1536)),
]


def group_step(rows: int, features: int, outs: tuple[int, ...], mode: str) -> Callable[[], None]:
    """One forward + backward of a group's adapters; ``mode``: separate, stacked or none."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(rows, features, generator=generator)
    a = [torch.randn(RANK, features, generator=generator, requires_grad=True) for _ in outs]
    b = [torch.randn(o, RANK, generator=generator, requires_grad=True) for o in outs]
    base = [torch.randn(rows, o, generator=generator) for o in outs]
    scale = ALPHA / RANK

    def step() -> None:
        x = x0.clone().requires_grad_()
        if mode == "none":
            ys = [out + 0 * x.sum() for out in base]  # backward reaches x, as with adapters
        elif mode == "separate":
            ys = [
                torch.addmm(out, x @ ai.t(), bi.t(), alpha=scale)
                for ai, bi, out in zip(a, b, base, strict=True)
            ]
        else:
            hidden = (x @ torch.cat(a).t()).split(RANK, dim=1)
            ys = [
                torch.addmm(out, h, bi.t(), alpha=scale)
                for h, bi, out in zip(hidden, b, base, strict=True)
            ]
        sum(y.sum() for y in ys).backward()

    return step


def interleaved_medians(
    steps: dict[str, Callable[[], None]], repeats: int = 50, rounds: int = 21
) -> dict[str, float]:
    """Median milliseconds per step of each variant, measured in alternating rounds: the
    machine's drift (frequency, neighbours) then falls on all of them alike."""
    for step in steps.values():
        for _ in range(20):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            for _ in range(repeats):
                step()
            times[name].append((time.perf_counter() - started) / repeats * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    lines = [
        f"LoRA r={RANK} adapters of one group of projections that share their input, forward + "
        f"backward, median of 21 interleaved rounds of 50; {cpu_name()}, torch {torch.__version__}.",
        "",
        "| model | group | no adapter (ms) | separate A (ms) | stacked A (ms) | adapter cost, separate (ms) | adapter cost, stacked (ms) | stacked / separate, adapter cost |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, group, rows, features, outs in GROUPS:
        ms = interleaved_medians(
            {
                mode: group_step(rows, features, outs, mode)
                for mode in ("none", "separate", "stacked")
            }
        )
        none, separate, stacked = ms["none"], ms["separate"], ms["stacked"]
        lines.append(
            f"| {model} | {group} | {none:.3f} | {separate:.3f} | {stacked:.3f} | "
            f"{separate - none:.3f} | {stacked - none:.3f} | "
            f"{(stacked - none) / (separate - none):.2f}x |"
        )
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora_stacking-cpu.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
