"""QLoRA training step: lightning_peft against Hugging Face PEFT + bitsandbytes, and the floor.

Three variants train on the same model (SmolLM2-135M's architecture, random weights, so
nothing is downloaded), the same NF4 base with double quantization, and the same batch:

    ours   lightning_peft: quantize_model + apply_adapters(LoRA r=16, all linear layers)
    peft   Hugging Face PEFT: get_peft_model(LoraConfig(r=16, "all-linear")) on that base
    floor  the frozen NF4 base alone: forward + backward to the inputs, no adapters
    ours-gc, peft-gc   ours and peft with gradient (activation) checkpointing, non-reentrant
    ours-compiled, peft-compiled, floor-compiled   (with --compiled) each decoder layer
                       torch.compile'd (lightning_peft.compiling.compile_layers), no KV cache

Each variant runs in its own process (so peak memory is its own). Prints a markdown table
with median step time, peak memory, bits per parameter and the ratios, and saves it to
benchmarks/results/qlora_speed-<device>.md.

    python benchmarks/qlora_speed.py                     # CPU: batch 2 x 128, 10 steps, 3 rounds
    python benchmarks/qlora_speed.py --device cuda       # GPU: batch 8 x 512, 30 steps, 3 rounds
    python benchmarks/qlora_speed.py --compiled          # and the compiled variants
    python benchmarks/qlora_speed.py --device cuda --compiled --compile-mode reduce-overhead
    python benchmarks/qlora_speed.py --model small --batch 4  # tiny Llama: hidden 256, 4 layers
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lightning_peft.demos import smollm2_config, tiny_llama

VARIANTS = ("ours", "peft", "floor", "ours-gc", "peft-gc")
COMPILED = ("ours-compiled", "peft-compiled", "floor-compiled")
RESULTS = Path(__file__).parent / "results"


MODELS = {
    "smollm2": "SmolLM2-135M architecture (random weights)",
    "small": "tiny Llama (hidden 256, 4 layers, vocabulary 256, random weights)",
    "llama1b": "a 1.1B Llama architecture (TinyLlama-1.1B's shapes, random weights)",
}


def llama1b_config():
    """TinyLlama-1.1B's shapes: hidden 2048, 22 layers, 32 query / 4 key-value heads."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
    )


def build(
    variant: str,
    device: str,
    compute_dtype: torch.dtype,
    compile_mode: str = "default",
    model_name: str = "smollm2",
):
    if variant.endswith("-compiled"):
        from lightning_peft.compiling import compile_layers

        model = build(
            variant.removesuffix("-compiled"), device, compute_dtype, model_name=model_name
        )
        compile_layers(model, mode=compile_mode)
        return model
    from transformers import LlamaForCausalLM

    from lightning_peft import LoRA, apply_adapters
    from lightning_peft.quantization import quantize_model

    torch.manual_seed(0)
    if model_name == "small":  # where the adapters' share of the step is largest
        model = tiny_llama(hidden_size=256, num_hidden_layers=4)
    elif model_name == "llama1b":
        model = LlamaForCausalLM(llama1b_config())
    else:
        model = LlamaForCausalLM(smollm2_config())
    quantize_model(model, "nf4", compute_dtype=compute_dtype, device=device)
    model.to(device)
    if variant.startswith("ours"):
        apply_adapters(model, LoRA(rank=16, alpha=32, target_modules="all-linear"))
        if variant == "ours-gc":
            from lightning_peft.lightning.mixin import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)
    elif variant.startswith("peft"):
        import peft

        config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
        model = peft.get_peft_model(model, config)
        if variant == "peft-gc":  # as PEFT's docs do it, non-reentrant like ours
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    else:
        model.requires_grad_(False)
        model.enable_input_require_grads()  # backward runs through every layer, as with adapters
    return model.train()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_variant(
    variant: str,
    device: str,
    steps: int,
    batch: int,
    seq: int,
    compile_mode: str = "default",
    model_name: str = "smollm2",
) -> dict:
    from lightning_peft.quantization import memory_report

    compute_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build(variant, device, compute_dtype, compile_mode, model_name)
    compiled = variant.endswith("-compiled")
    # A KV cache hands each layer its index, and every layer would compile anew.
    forward_options = {"use_cache": False} if compiled else {}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None  # the floor has none
    input_ids = torch.randint(
        0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)
    ).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, backward_times = [], []
    for step in range(steps + 3):  # 3 warm-up steps
        synchronize(device)
        started = time.perf_counter()
        if compiled and compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device, dtype=compute_dtype, enabled=device == "cuda"):
            loss = model(input_ids=input_ids, labels=input_ids, **forward_options).loss
        loss.backward()
        synchronize(device)
        backward_done = time.perf_counter()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= 3:
            times.append(time.perf_counter() - started)
            backward_times.append(backward_done - started)
    report = memory_report(model, optimizer)
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "variant": variant,
        "median_s": statistics.median(times),
        "forward_backward_s": statistics.median(backward_times),
        "peak_mib": peak / 2**20,
        "trainable": sum(p.numel() for p in trainable),
        "bits_per_param": report.bits_per_parameter(),
        "quantized_bits": report.quantized_bits_per_parameter,
        "loss": loss.item(),
    }


def cpu_name() -> str:
    """The CPU's model name, its threads for torch and whether it has AVX512-BF16 (which
    changes bitsandbytes' 4-bit path)."""
    model, bf16 = "CPU", False
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
        names = re.findall(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
        model = names[0].strip() if names else model
        bf16 = "avx512_bf16" in info
    return f"{model} ({torch.get_num_threads()} threads, AVX512-BF16 {'yes' if bf16 else 'no'})"


def run_child(variant: str, args: argparse.Namespace) -> dict:
    """``run_variant`` in a fresh process (so peak memory is the variant's own)."""
    command = [sys.executable, __file__, "--variant", variant, "--device", args.device]
    command += ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
    command += ["--compile-mode", args.compile_mode, "--model", args.model]
    child = subprocess.run(command, capture_output=True, text=True, check=False)
    if child.returncode != 0:
        sys.exit(f"variant {variant} failed:\n{child.stderr}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def table(rows: dict[str, dict], args: argparse.Namespace, device_name: str) -> str:
    ours, peft, floor = rows["ours"], rows["peft"], rows["floor"]
    ours_gc, peft_gc = rows["ours-gc"], rows["peft-gc"]
    lines = [
        f"QLoRA step, {MODELS[args.model]}, NF4 + double quantization, "
        f"LoRA r=16 on all linear layers, batch {args.batch} x {args.seq}, median of {args.steps} "
        f"steps, median of {args.rounds} rounds (each a fresh process), {device_name}, torch "
        f"{torch.__version__}.",
        "",
        "| variant | step time (s) | rounds' range (s) | forward+backward (s) | peak memory (MiB) | trainable params | bits/param (all state) | bits/param (4-bit weights) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in (
        ("ours", "lightning_peft"),
        ("peft", "HF PEFT + bitsandbytes"),
        ("floor", "frozen-base floor"),
        ("ours-gc", "lightning_peft, gradient checkpointing"),
        ("peft-gc", "HF PEFT + bitsandbytes, gradient checkpointing"),
        ("ours-compiled", "lightning_peft, layers compiled"),
        ("peft-compiled", "HF PEFT + bitsandbytes, layers compiled"),
        ("floor-compiled", "frozen-base floor, layers compiled"),
    ):
        if name not in rows:
            continue
        row = rows[name]
        lines.append(
            f"| {label} | {row['median_s']:.4f} | {row['spread'][0]:.4f}-{row['spread'][1]:.4f} | "
            f"{row['forward_backward_s']:.4f} | "
            f"{row['peak_mib']:.0f} | {row['trainable']:,} | "
            f"{row['bits_per_param']:.3f} | {row['quantized_bits']:.3f} |"
        )
    lines += [
        "",
        f"- step time, lightning_peft / PEFT: **{ours['median_s'] / peft['median_s']:.3f}x** (target: <= 1.00)",
        f"- forward+backward, lightning_peft / floor: **{ours['forward_backward_s'] / floor['forward_backward_s']:.3f}x** "
        f"(target: <= 1.10; the floor has no optimizer step, so this compares like with like)",
        f"- forward+backward, lightning_peft / PEFT: **{ours['forward_backward_s'] / peft['forward_backward_s']:.3f}x**",
        f"- whole step (with AdamW), lightning_peft / floor: {ours['median_s'] / floor['median_s']:.3f}x",
        f"- peak memory, lightning_peft / PEFT: **{ours['peak_mib'] / peft['peak_mib']:.3f}x**",
        f"- gradient checkpointing, lightning_peft: peak memory {ours_gc['peak_mib']:.0f} MiB "
        f"against {ours['peak_mib']:.0f} ({ours_gc['peak_mib'] / ours['peak_mib']:.3f}x), "
        f"step time {ours_gc['median_s'] / ours['median_s']:.3f}x",
        f"- with gradient checkpointing, lightning_peft / PEFT: step time "
        f"**{ours_gc['median_s'] / peft_gc['median_s']:.3f}x**, peak memory "
        f"**{ours_gc['peak_mib'] / peft_gc['peak_mib']:.3f}x**",
    ]
    if "ours-compiled" in rows:
        compiled = rows["ours-compiled"]
        lines += [
            f"- each decoder layer compiled (`--compiled`, mode {args.compile_mode!r}, no KV "
            f"cache): forward+backward, lightning_peft / floor, both compiled: "
            f"**{compiled['forward_backward_s'] / rows['floor-compiled']['forward_backward_s']:.3f}x**; "
            f"step time, lightning_peft / PEFT, both compiled: "
            f"**{compiled['median_s'] / rows['peft-compiled']['median_s']:.3f}x**; compiled "
            f"lightning_peft / eager floor (forward+backward): "
            f"{compiled['forward_backward_s'] / floor['forward_backward_s']:.3f}x",
        ]
    if args.device == "cpu":
        lines.append(
            "- CPU peak memory is the process's peak resident set (includes Python and torch)."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=list(MODELS), default="smollm2")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="fresh-process runs per variant")
    parser.add_argument("--compiled", action="store_true", help="add the compiled variants")
    parser.add_argument("--compile-mode", default="default", help="torch.compile's mode")
    parser.add_argument("--variant", choices=VARIANTS + COMPILED, help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.steps = args.steps or (30 if gpu else 10)
    args.batch = args.batch or (8 if gpu else 2)
    args.seq = args.seq or (512 if gpu else 128)
    args.rounds = args.rounds or 3
    if args.variant:  # child process: one variant, JSON out
        result = run_variant(
            args.variant,
            args.device,
            args.steps,
            args.batch,
            args.seq,
            args.compile_mode,
            args.model,
        )
        print(json.dumps(result))
        return
    if gpu and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible to torch")
    # Small models are launch-bound, and launch overhead drifts with the machine; rounds in
    # rotated order, each variant in a fresh process, and the median over rounds even it out.
    variants = VARIANTS + COMPILED if args.compiled else VARIANTS
    runs: dict[str, list[dict]] = {variant: [] for variant in variants}
    for round_index in range(args.rounds):
        shift = round_index % len(variants)
        order = variants[shift:] + variants[:shift]
        for variant in order:
            runs[variant].append(run_child(variant, args))
            print(
                f"round {round_index + 1} {variant}: {runs[variant][-1]['median_s']:.4f} s/step",
                file=sys.stderr,
            )
    rows = {}
    for variant, results in runs.items():
        rows[variant] = dict(results[0])
        rows[variant]["median_s"] = statistics.median(r["median_s"] for r in results)
        rows[variant]["forward_backward_s"] = statistics.median(
            r["forward_backward_s"] for r in results
        )
        rows[variant]["spread"] = (
            min(r["median_s"] for r in results),
            max(r["median_s"] for r in results),
        )
    device_name = torch.cuda.get_device_name() if gpu else cpu_name()
    text = table(rows, args, device_name)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    suffix = ("-small" if args.model == "small" else "") + ("-compiled" if args.compiled else "")
    (RESULTS / f"qlora_speed-{args.device}{suffix}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
