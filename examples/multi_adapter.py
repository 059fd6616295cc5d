"""Two tasks, one frozen base, one batch: named LoRA adapters trained in mixed-task batches.

A tiny Llama (random weights, built from a config) gets two LoRA adapters: "up" learns to
count up (17, 18, 19, ...), "down" to count down (17, 16, 15, ...). Every training batch
mixes rows of both tasks; ``mixed_batch`` sends each row through its own adapter in one
forward pass. Afterwards each adapter solves its own task and not the other's, and
``disable_adapters`` gives back the base model.

    python examples/multi_adapter.py       # about 20 seconds on 2 CPU cores
"""

from __future__ import annotations

import time

import torch
from counting import counting_rows, next_token_accuracy, tiny_llama

from lightning_peft import LoRA, apply_adapters, disable_adapters, mixed_batch, set_active_adapters

VOCAB, SEQ, STEPS = 64, 12, 150


def rows(task: str, count: int, seed: int) -> torch.Tensor:
    """Rows of one task: "up" counts 17, 18, 19, ...; "down" counts 17, 16, 15, ..."""
    return counting_rows(count, SEQ, VOCAB, seed, step=1 if task == "up" else -1)


def main() -> None:
    torch.manual_seed(0)
    model = tiny_llama(VOCAB)
    for task in ("up", "down"):
        apply_adapters(model, LoRA(rank=8, alpha=16, target_modules="all-linear"), name=task)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    started = time.perf_counter()
    for step in range(STEPS):
        # 32 rows per batch, half of each task, shuffled together.
        batch = torch.cat([rows("up", 16, step), rows("down", 16, 10_000 + step)])
        order = torch.randperm(32, generator=torch.Generator().manual_seed(step))
        batch, row_tasks = batch[order], [(["up"] * 16 + ["down"] * 16)[i] for i in order]
        with mixed_batch(model, row_tasks):  # each row through its own adapter, one pass
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(
        f"trained {STEPS} mixed batches in {time.perf_counter() - started:.1f} s (loss {loss.item():.3f})"
    )

    model.eval()
    held_out = {task: rows(task, 64, seed=99) for task in ("up", "down")}
    with disable_adapters(model):
        base = {task: next_token_accuracy(model, held_out[task]) for task in held_out}
    print(f"base model:      counting up {base['up']:.2f}, counting down {base['down']:.2f}")
    for adapter in ("up", "down"):
        set_active_adapters(model, adapter)
        scores = {task: next_token_accuracy(model, held_out[task]) for task in held_out}
        print(
            f"adapter {adapter!r:<6}:  counting up {scores['up']:.2f}, counting down {scores['down']:.2f}"
        )
    with mixed_batch(model, ["up"] * 64 + ["down"] * 64):
        both = next_token_accuracy(model, torch.cat([held_out["up"], held_out["down"]]))
    print(f"mixed batch:     {both:.2f} on both tasks at once")


if __name__ == "__main__":
    main()
