"""Run as a script: the peak memory (RSS) one QLoRA training step adds, for a Llama of the
given sizes; prints it in bytes. A process of its own, so the peak is this step's."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_peft import LoRA, apply_adapters
from lightning_peft.quantization import quantize_model


def status(field: str) -> int:
    """A memory figure of this process from Linux's /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("hidden", "layers", "intermediate", "vocab", "batch", "seq_len"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, required=True)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
    )
    model = quantize_model(LlamaForCausalLM(config), "nf4")
    apply_adapters(model, LoRA(rank=8, target_modules="all-linear"))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    # One step first: allocator pools and lazily built kernels are not the step's memory.
    for step in range(3):
        if step == 1:
            Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again here
            before = status("VmRSS")
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(status("VmHWM") - before)


if __name__ == "__main__":
    main()
