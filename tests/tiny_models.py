"""Tiny models built from transformers configs: real architectures that run in milliseconds."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
)

from lightning_peft import demos

VOCAB = 256


def tiny_llama(
    seed: int = 0,
    bias: bool = False,
    init_std: float = 0.02,
    vocab_size: int = VOCAB,
    tie_word_embeddings: bool = False,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
) -> LlamaForCausalLM:
    """``lightning_peft.demos.tiny_llama`` (the examples' and benchmarks' too), seeded and in
    eval mode as ``from_pretrained`` returns models."""
    return demos.tiny_llama(
        vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        init_std=init_std,
        bias=bias,
        tie_word_embeddings=tie_word_embeddings,
        seed=seed,
    ).eval()


def adapted_llama(seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama with LoRA on q and v, its B moved off zero (so merges and exports differ
    from the base), the same for the same ``seed``."""
    from lightning_peft import LoRA, apply_adapters

    model = apply_adapters(tiny_llama(), LoRA(rank=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(seed))
    return model


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=VOCAB,
        num_labels=3,
    )
    return BertForSequenceClassification(config).eval()


MODEL_FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def peft_or_skip(build, *args, **kwargs):
    """``build(*args, **kwargs)`` with Hugging Face PEFT, or skip the test naming what the
    installed PEFT cannot do (older releases lack LoRA on Conv1d and MultiheadAttention, and
    0.14 cannot build T5 prefix tuning under transformers 4.56)."""
    import peft
    import pytest

    try:
        return build(*args, **kwargs)
    except (ValueError, AttributeError) as error:
        pytest.skip(f"peft {peft.__version__} cannot: {str(error).splitlines()[0][:120]}")
