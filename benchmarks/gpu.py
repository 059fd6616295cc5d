"""QLoRA on a GPU in one command: lightning_peft, PEFT + bitsandbytes and the frozen-base
floor, eager and with compiled layers, on two model sizes and two batch shapes; one table.

Each cell is one fresh process of benchmarks/qlora_speed.py (its variants: `ours`, `peft`,
`floor`, each also `-compiled`: every decoder layer through torch.compile, mode
reduce-overhead, CUDA graphs) on an NF4 base with double quantization, LoRA r=16 on all
linear layers, bf16 autocast. Reported: median step time, tokens per second and peak
memory, and the ratios the goals are stated in. Writes benchmarks/results/gpu.md.

    python benchmarks/gpu.py                   # on one GPU: about 8 minutes on an H100
    python benchmarks/gpu.py --device cpu --models small --shapes 1x16 --steps 1  # smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import qlora_speed

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("ours", "peft", "floor", "ours-compiled", "peft-compiled", "floor-compiled")
LABELS = {
    "ours": "lightning_peft",
    "peft": "PEFT + bitsandbytes",
    "floor": "frozen-base floor",
}


def run_cell(model: str, batch: int, seq: int, args: argparse.Namespace) -> dict[str, dict]:
    options = argparse.Namespace(
        device=args.device,
        steps=args.steps,
        batch=batch,
        seq=seq,
        compile_mode=args.compile_mode,
        model=model,
    )
    found = {}
    for variant in VARIANTS:
        found[variant] = qlora_speed.run_child(variant, options)
        print(
            f"{model} {batch}x{seq} {variant}: {found[variant]['median_s']:.4f} s/step", flush=True
        )
    return found


def table(cells: dict[tuple[str, str], dict[str, dict]], args: argparse.Namespace) -> str:
    name = torch.cuda.get_device_name() if args.device == "cuda" else qlora_speed.cpu_name()
    lines = [
        f"QLoRA step on {name}, torch {torch.__version__}: NF4 + double quantization, LoRA r=16 "
        f"on all linear layers, {'bf16 autocast, ' if args.device == 'cuda' else ''}median of "
        f"{args.steps} steps; compiled = each decoder layer torch.compile'd, mode "
        f"{args.compile_mode!r}. `python benchmarks/gpu.py`",
        "",
        "| model | batch | variant | eager step (s) | eager tokens/s | eager peak (MiB) "
        "| compiled step (s) | compiled tokens/s | compiled peak (MiB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    goals = []
    for (model, shape), rows in cells.items():
        batch, seq = (int(n) for n in shape.split("x"))
        tokens = batch * seq
        for variant, label in LABELS.items():
            eager, compiled = rows[variant], rows[f"{variant}-compiled"]
            lines.append(
                f"| {model} | {shape} | {label} | {eager['median_s']:.4f} | "
                f"{tokens / eager['median_s']:,.0f} | {eager['peak_mib']:,.0f} | "
                f"{compiled['median_s']:.4f} | {tokens / compiled['median_s']:,.0f} | "
                f"{compiled['peak_mib']:,.0f} |"
            )
        ours, peft, floor = rows["ours"], rows["peft"], rows["floor"]
        goals.append(
            f"- {model}, {shape}: forward+backward / floor, compiled "
            f"{rows['ours-compiled']['forward_backward_s'] / rows['floor-compiled']['forward_backward_s']:.3f}x "
            f"(eager {ours['forward_backward_s'] / floor['forward_backward_s']:.3f}x); tokens/s vs "
            f"PEFT eager {peft['median_s'] / ours['median_s']:.2f}x, vs PEFT compiled "
            f"{rows['peft-compiled']['median_s'] / rows['ours-compiled']['median_s']:.2f}x; peak "
            f"memory vs PEFT {ours['peak_mib'] / peft['peak_mib']:.2f}x"
        )
    return "\n".join([*lines, "", *goals]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--models", nargs="+", default=["smollm2", "llama1b"])
    parser.add_argument("--shapes", nargs="+", default=["8x512", "32x1024"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile-mode", default="reduce-overhead")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.md")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device is visible to torch: run on a GPU machine (or --device cpu)")
    if args.device == "cpu" and args.compile_mode == "reduce-overhead":
        args.compile_mode = "default"  # CUDA graphs need CUDA
    cells = {}
    for model in args.models:
        for shape in args.shapes:
            batch, seq = (int(n) for n in shape.split("x"))
            cells[(model, shape)] = run_cell(model, batch, seq, args)
    text = table(cells, args)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
