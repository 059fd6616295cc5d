"""LoRA on a 4-bit (NF4) tiny Llama in plain PyTorch, no Lightning: about five seconds.

The base model is built from a config (random weights, nothing downloaded), quantized to
NF4 with bitsandbytes, and given LoRA adapters on every linear layer. The adapters then
learn a small rule the base cannot know: the next token is the current token plus one.

    python examples/plain_pytorch.py
"""

from __future__ import annotations

import io
import time

import torch
from counting import counting_rows, next_token_accuracy, tiny_llama

from lightning_peft import (
    LoRA,
    adapter_state_dict,
    apply_adapters,
    count_parameters,
    merge_adapters,
)
from lightning_peft.quantization import quantize_model

VOCAB, SEQ, BATCH, STEPS = 128, 16, 32, 120


def main() -> None:
    torch.manual_seed(0)
    model = tiny_llama(VOCAB)
    quantize_model(model, "nf4")  # every linear layer but the head, double-quantized
    apply_adapters(model, LoRA(rank=16, alpha=32, target_modules="all-linear"))
    print(f"parameters: {count_parameters(model)}")

    held_out = counting_rows(BATCH, SEQ, VOCAB, seed=1234)
    print(f"next-token accuracy before: {next_token_accuracy(model, held_out):.2f}")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    model.train()
    for step in range(1, STEPS + 1):
        input_ids = counting_rows(BATCH, SEQ, VOCAB, seed=generator)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 20 == 0:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    model.eval()
    print(f"trained {STEPS} steps in {time.perf_counter() - started:.1f} s")
    print(f"next-token accuracy after:  {next_token_accuracy(model, held_out):.2f}")

    buffer = io.BytesIO()
    torch.save(adapter_state_dict(model), buffer)
    print(f"adapter state dict: {buffer.getbuffer().nbytes / 1024:.0f} KiB")
    report = merge_adapters(model)
    print(
        f"merged {report.changed} layers into the NF4 base (largest weight rounding "
        f"{report.max_abs_error:.4f}); accuracy merged: {next_token_accuracy(model, held_out):.2f}"
    )


if __name__ == "__main__":
    main()
