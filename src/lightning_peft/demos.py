"""Models for examples, tests and benchmarks, built from transformers configs: real
architectures with random weights, nothing downloaded (as ``lightning.pytorch.demos`` does
for Lightning). The examples, the test suite and the benchmarks all build theirs here."""

from __future__ import annotations

from typing import Any

import torch


def tiny_llama(
    vocab_size: int = 256,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    init_std: float = 0.02,
    bias: bool = False,
    tie_word_embeddings: bool = False,
    seed: int | None = None,
) -> Any:
    """A small Llama (grouped-query attention, 4 heads over 2 key/value heads) that runs in
    milliseconds on a CPU; ``bias=True`` gives its linear layers biases. With ``seed`` the
    same weights every time (torch is seeded with it), else the next ones torch draws.

    With the usual ``init_std`` the output head is nearly uniform, so no adapter moves the
    loss far; a wider one (0.1 to 0.3) gives a frozen head confident enough for adapters to
    visibly lower the loss in a few steps.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        attention_bias=bias,
        mlp_bias=bias,
        initializer_range=init_std,
    )
    return LlamaForCausalLM(config)


def smollm2_config() -> Any:
    """The architecture of SmolLM2-135M (HuggingFaceTB/SmolLM2-135M-Instruct: 30 layers,
    hidden 576, 9 query / 3 key-value heads, tied head): a real model's shapes, for timing
    and memory, without its weights."""
    from transformers import LlamaConfig

    # transformers 4.x's argument; 5.x takes it into rope_parameters (and types it so).
    rope: dict[str, Any] = {"rope_theta": 100000.0}
    return LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        **rope,
    )
