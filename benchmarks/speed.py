"""lightning_peft against Hugging Face PEFT + bitsandbytes on the same QLoRA model, in one run.

SmolLM2-135M's architecture (random weights, nothing downloaded), NF4 base with double
quantization, LoRA r=16 on all linear layers -- the setup of benchmarks/qlora_speed.py, whose
training-step variants this script runs (each in a fresh process, for its own peak memory).
Added here: inference latency with the adapters unmerged and merged into the 4-bit base,
and the size of the adapter file each library writes. Ratios are ours / PEFT (below 1 is
better for us). Writes benchmarks/results/speed-<device>.md and speed-<device>.png.

    python benchmarks/speed.py                      # CPU, about 3 minutes
    python benchmarks/speed.py --device cuda --batch 8 --seq 512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import qlora_speed

RESULTS = Path(__file__).parent / "results"


def latency(model: torch.nn.Module, ids: torch.Tensor, device: str, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for index in range(repeats + 2):
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            model(input_ids=ids)
            if device == "cuda":
                torch.cuda.synchronize()
            if index >= 2:  # warm-up
                times.append(time.perf_counter() - started)
    return statistics.median(times)


def inference_and_files(variant: str, args: argparse.Namespace) -> dict:
    compute_dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = qlora_speed.build(variant, args.device, compute_dtype).eval()
    with torch.no_grad():  # B = 0 at init would make merging trivial: train-like values
        generator = torch.Generator().manual_seed(0)
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_B" in name:
                param.copy_(0.01 * torch.randn(param.shape, generator=generator))
    ids = torch.randint(0, 49152, (1, args.seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(args.device)
    with torch.autocast(args.device, dtype=compute_dtype, enabled=args.device == "cuda"):
        unmerged = latency(model, ids, args.device, args.repeats)
    with tempfile.TemporaryDirectory() as folder:
        if variant == "ours":
            from lightning_peft import merge_adapters, save_peft

            save_peft(model, folder)
            merge = merge_adapters
        else:
            model.save_pretrained(folder)
            merge = lambda m: m.merge_adapter()  # noqa: E731
        file_bytes = (Path(folder) / "adapter_model.safetensors").stat().st_size
    merge(model)
    with torch.autocast(args.device, dtype=compute_dtype, enabled=args.device == "cuda"):
        merged = latency(model, ids, args.device, args.repeats)
    return {"unmerged_s": unmerged, "merged_s": merged, "adapter_file_bytes": file_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=10, help="timed inference passes")
    args = parser.parse_args()
    rows = {}
    for variant in ("ours", "peft"):
        rows[variant] = {
            **qlora_speed.run_child(variant, args),
            **inference_and_files(variant, args),
        }
        print(f"{variant}: {rows[variant]}", file=sys.stderr)
    ours, peft = rows["ours"], rows["peft"]
    measures = [
        ("training step (s)", "median_s", "{:.3f}"),
        ("peak memory, training (MiB)", "peak_mib", "{:,.0f}"),
        ("inference, adapters unmerged (s)", "unmerged_s", "{:.4f}"),
        ("inference, adapters merged (s)", "merged_s", "{:.4f}"),
        ("adapter file (KiB)", "adapter_file_bytes", "{:,.0f}"),
    ]
    device_name = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    lines = [
        f"lightning_peft vs Hugging Face PEFT + bitsandbytes: SmolLM2-135M architecture, NF4 + "
        f"double quantization, LoRA r=16 on all linear layers; training batch {args.batch} x "
        f"{args.seq} (median of {args.steps} steps), inference 1 x {args.seq} (median of "
        f"{args.repeats}); {device_name}, torch {torch.__version__}.",
        "",
        "| measure | lightning_peft | HF PEFT | ours / PEFT |",
        "|---|---:|---:|---:|",
    ]
    ratios = {}
    for label, key, fmt in measures:
        a, b = ours[key], peft[key]
        if key == "adapter_file_bytes":
            a, b = a / 1024, b / 1024
        ratios[label] = a / b
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {a / b:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"speed-{args.device}.md").write_text(text)
    plot(ratios, RESULTS / f"speed-{args.device}.png", device_name)


def plot(ratios: dict[str, float], path: Path, device_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 3.2))
    labels = list(ratios)
    axes.barh(labels, [ratios[k] for k in labels], color="tab:purple")
    axes.axvline(1.0, color="black", linewidth=1)
    axes.invert_yaxis()
    axes.set_xlabel("lightning_peft / HF PEFT (below 1: ours is better)")
    axes.set_title(f"QLoRA, SmolLM2-135M architecture, {device_name}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
