"""Mixed-task batches: one batch whose rows go through different adapters, against one adapter.

On SmolLM2-135M's architecture (random weights, nothing downloaded), K named adapters of one
method are attached (LoRA r=8 on q/v, or IA3). For the same batch of B rows:

    single      one adapter active for all rows (the throughput to match)
    mixed-K     rows spread over K adapters with lightning_peft.mixed_batch (one pass)
    split-K     the usual way without mixed batches: K passes, one per adapter, over its rows

Training (forward + backward) and inference (forward) are timed separately; the table gives
medians, tokens per second and each variant's throughput relative to ``single``. Saved to
benchmarks/results/mixed_batch-<device>.md.

    python benchmarks/mixed_batch.py                 # CPU: batch 8 x 64, 5 repeats
    python benchmarks/mixed_batch.py --device cuda --batch 32 --seq 512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from lightning_peft import IA3, LoRA, apply_adapters, mixed_batch, set_active_adapters
from lightning_peft.demos import smollm2_config

RESULTS = Path(__file__).parent / "results"
NAMES = ("a", "b", "c", "d")


def build(method: str, adapters: int, device: str) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_config()).to(device)
    for name in NAMES[:adapters]:
        config = LoRA(rank=8, target_modules=["q_proj", "v_proj"]) if method == "lora" else IA3()
        apply_adapters(model, config, name=name)
    return model.train()


def timed(step, device: str, repeats: int) -> float:
    for _ in range(2):  # warm-up
        step()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(method: str, adapters: int, args: argparse.Namespace) -> dict[str, float]:
    model = build(method, adapters, args.device)
    ids = torch.randint(
        0, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    )
    ids = ids.to(args.device)
    rows = [NAMES[i % adapters] for i in range(args.batch)]

    def train_step(batch: torch.Tensor) -> None:
        model(input_ids=batch, labels=batch).loss.backward()

    def infer(batch: torch.Tensor) -> None:
        with torch.no_grad():
            model(input_ids=batch)

    def single(work) -> None:
        set_active_adapters(model, NAMES[0])
        work(ids)

    def mixed(work) -> None:
        with mixed_batch(model, rows):
            work(ids)

    def split(work) -> None:
        for k in range(adapters):
            set_active_adapters(model, NAMES[k])
            work(ids[k::adapters])

    results = {}
    for mode, work in (("train", train_step), ("infer", infer)):
        results[f"single-{mode}"] = timed(lambda w=work: single(w), args.device, args.repeats)
        if adapters > 1:
            results[f"mixed-{mode}"] = timed(lambda w=work: mixed(w), args.device, args.repeats)
            results[f"split-{mode}"] = timed(lambda w=work: split(w), args.device, args.repeats)
        model.zero_grad(set_to_none=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--adapters", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    tokens = args.batch * args.seq
    lines = [
        f"Mixed-task batches, SmolLM2-135M architecture (random weights, fp32), batch "
        f"{args.batch} x {args.seq}, median of {args.repeats} repeats, {args.device} "
        f"({torch.get_num_threads()} threads), torch {torch.__version__}.",
        "",
        "| method | adapters | variant | train step (s) | train tokens/s | vs single | inference (s) | inference tokens/s | vs single |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method in ("lora", "ia3"):
        for adapters in args.adapters:
            result = measure(method, adapters, args)
            for variant in ("single", "mixed", "split"):
                train, infer = result[f"{variant}-train"], result[f"{variant}-infer"]
                lines.append(
                    f"| {method} | {adapters} | {variant} | {train:.3f} | {tokens / train:,.0f} | "
                    f"{result['single-train'] / train:.2f}x | {infer:.3f} | {tokens / infer:,.0f} | "
                    f"{result['single-infer'] / infer:.2f}x |"
                )
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"mixed_batch-{args.device}.md").write_text(text)


if __name__ == "__main__":
    main()
