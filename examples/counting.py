"""The toy task of the tiny examples (quickstart, plain_pytorch, mixin, multi_adapter).

A small Llama built from a config (random weights, nothing downloaded) and rows that count:
17, 18, 19, ... The frozen base cannot know the rule; adapters learn it in seconds on a CPU.
These examples show the API; ``demo.py`` and the other examples use real models.
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from lightning_peft import demos


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    """Fresh random weights: seed torch first to get the same base every time. Wider than
    the default init, so the frozen head can be confident."""
    return demos.tiny_llama(vocab_size, init_std=0.1)


def counting_rows(
    count: int, length: int, vocab_size: int, seed: int | torch.Generator, step: int = 1
) -> torch.Tensor:
    """``count`` rows counting by ``step`` from random starts (mod ``vocab_size``). An int
    ``seed`` gives the same rows every time; a generator draws the next rows from it."""
    generator = torch.Generator().manual_seed(seed) if isinstance(seed, int) else seed
    start = torch.randint(0, vocab_size, (count, 1), generator=generator)
    return (start + step * torch.arange(length)) % vocab_size


@torch.no_grad()
def next_token_accuracy(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    """How often the model predicts each next token, scored in eval mode."""
    was_training = model.training
    model.eval()
    predictions = model(input_ids=input_ids).logits[:, :-1].argmax(-1)
    model.train(was_training)
    return (predictions == input_ids[:, 1:]).float().mean().item()
