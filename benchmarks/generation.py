"""Greedy generation on an NF4 base: lightning_peft against PEFT + bitsandbytes, on the CPU.

SmolLM2-135M's architecture (random weights, nothing downloaded), NF4 with double
quantization, LoRA r=16 on all linear layers, the setup of benchmarks/qlora_speed.py; a
32-token prompt continued by 32 tokens, batch 1 and 8. Three models, built in one process
per CPU path and timed in turn (A, B, C, A, B, C, ...: a shared machine's speed drifts by
more than the differences, and so each drift meets all three); each figure is the fastest
of 5 calls after a warm-up:

    peft        PEFT's LoRA on the same 4-bit base, bitsandbytes left to choose its layout
                (on a CPU with AVX512-BF16 it repacks each layer at the first eval pass)
    ours        what `lightning-peft serve` and an evaluation with no training ahead run
                (`pack_for_cpu_inference_`: bitsandbytes' fast layout where the CPU has it)
    ours-exact  the layout training keeps (`serve --exact-4bit`)

Both of bitsandbytes' CPU paths: this CPU's and, where it has AVX512-BF16, the path without
it (forced off). Prints and saves benchmarks/results/generation-cpu.md.

    python benchmarks/generation.py        # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import qlora_speed
from serving import _cpu_model

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("peft", "ours", "ours-exact")
BATCHES = (1, 8)


def build(variant: str) -> torch.nn.Module:
    import bitsandbytes as bnb
    import bitsandbytes.functional

    from lightning_peft.quantization import pack_for_cpu_inference_

    model = qlora_speed.build(variant.removesuffix("-exact"), "cpu", torch.float32).eval()
    if variant == "peft":  # what bitsandbytes does on its own (the package turns it off)
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = bitsandbytes.functional.has_avx512bf16()
    elif variant == "ours":
        pack_for_cpu_inference_(model)
    return model


def measure(avx512bf16: bool, new_tokens: int, calls: int) -> dict[str, dict[int, float]]:
    """Seconds per generate call, by variant and batch size (run in this process)."""
    import bitsandbytes.functional

    if not avx512bf16:  # the path of a CPU without the instruction
        bitsandbytes.functional.has_avx512bf16 = lambda: False
    models = {variant: build(variant) for variant in VARIANTS}
    fastest: dict[str, dict[int, float]] = {variant: {} for variant in VARIANTS}
    for batch in BATCHES:
        ids = torch.randint(100, 40000, (batch, 32), generator=torch.Generator().manual_seed(1))
        for attempt in range(calls + 1):
            for variant, model in models.items():
                started = time.perf_counter()
                with torch.no_grad():
                    model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        do_sample=False,
                        pad_token_id=0,
                    )
                seconds = time.perf_counter() - started
                if attempt:  # the first is a warm-up (and bitsandbytes' own repacking)
                    fastest[variant][batch] = min(fastest[variant].get(batch, seconds), seconds)
    return fastest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per figure")
    parser.add_argument("--path", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path:
        print(json.dumps(measure(args.path == "on", args.new_tokens, args.calls)))
        return

    import bitsandbytes.functional

    paths = ["on", "off"] if bitsandbytes.functional.has_avx512bf16() else ["off"]
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for path in paths:
        command = [sys.executable, __file__, "--path", path, "--new-tokens", str(args.new_tokens)]
        command += ["--calls", str(args.calls)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        for variant, seconds in json.loads(done.stdout.strip().splitlines()[-1]).items():
            rows[(path, variant)] = seconds
            print(f"{path} {variant}: {seconds}", flush=True)
    print(write(rows, paths, args.new_tokens, args.calls))


def write(rows: dict, paths: list[str], new_tokens: int, calls: int) -> str:
    machine = f"{_cpu_model()} ({torch.get_num_threads()} threads)"
    lines = [
        f"Greedy generation, 32-token prompts + {new_tokens} new tokens, SmolLM2-135M "
        f"architecture, NF4 (double quantization), LoRA r=16 on all linear layers; {machine}, "
        f"torch {torch.__version__}; the fastest of {calls} calls, the three in turn. `python benchmarks/generation.py`",
        "",
        "| bitsandbytes CPU path | variant | "
        + " | ".join(f"batch {b} (s) | batch {b} vs PEFT" for b in BATCHES)
        + " |",
        "|---|---|" + "---:|---:|" * len(BATCHES),
    ]
    names = {"on": "AVX512-BF16 (this CPU)", "off": "without AVX512-BF16"}
    if paths == ["off"]:
        names["off"] = "without AVX512-BF16 (this CPU)"
    else:
        names["off"] = "without AVX512-BF16 (forced off)"
    for path in paths:
        peft = rows[(path, "peft")]
        for variant in VARIANTS:
            got = rows[(path, variant)]
            cells = " | ".join(
                f"{got[str(b)]:.2f} | {got[str(b)] / peft[str(b)]:.2f}x" for b in BATCHES
            )
            lines.append(f"| {names[path]} | {variant} | {cells} |")
    table = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generation-cpu.md").write_text(table)
    return table


if __name__ == "__main__":
    main()
