"""IA3() chooses its targets by model type, as Hugging Face PEFT does, and says what to pass
for a type it does not know."""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from lightning_peft import IA3, AdapterConfigError, apply_adapters, count_parameters
from tests.tiny_models import VOCAB, tiny_bert, tiny_gpt2, tiny_llama


def tiny_t5():
    torch.manual_seed(0)
    config = T5Config(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, vocab_size=VOCAB)
    return T5ForConditionalGeneration(config)


def tiny_qwen2():
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    return Qwen2ForCausalLM(config)


def tiny_neox():
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
    )
    return GPTNeoXForCausalLM(config)


FAMILIES = {
    "llama": (tiny_llama, "CAUSAL_LM"),
    "gpt2": (tiny_gpt2, "CAUSAL_LM"),
    "bert": (tiny_bert, "SEQ_CLS"),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM"),
    "qwen2": (tiny_qwen2, "CAUSAL_LM"),
    "gpt_neox": (tiny_neox, "CAUSAL_LM"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_follow_the_model_type_and_match_peft(family):
    build, task = FAMILIES[family]
    ours = apply_adapters(build(), IA3())
    theirs = peft.get_peft_model(build(), peft.IA3Config(task_type=task))
    trained = {n for n, p in ours.named_parameters() if p.requires_grad}
    expected = {  # BERT's classifier: PEFT trains a copy (modules_to_save), here the head
        n.removeprefix("base_model.model.").replace("modules_to_save.default.", "")
        for n, p in theirs.named_parameters()
        if p.requires_grad
    }
    assert trained == expected
    peft_trained = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert count_parameters(ours).trainable == peft_trained


def test_an_unknown_model_type_is_named_with_what_to_pass():
    model = tiny_llama()
    model.config.model_type = "my_llama"
    with pytest.raises(
        AdapterConfigError, match=r"knows none for model type 'my_llama': pass target_modules="
    ):
        apply_adapters(model, IA3())
    with pytest.raises(AdapterConfigError, match=r"Sequential \(not a transformers model\)"):
        apply_adapters(torch.nn.Sequential(torch.nn.Linear(4, 4)), IA3())
    # explicit targets need no table; their feed-forward part is the type's where known
    apply_adapters(
        model, IA3(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    )


def test_explicit_targets_take_the_types_feedforward_layers_among_them():
    model = apply_adapters(tiny_llama(), IA3(target_modules=["v_proj", "down_proj"]))
    layer = model.model.layers[0]
    assert layer.mlp.down_proj.feedforward == {"default": True}
    assert layer.self_attn.v_proj.feedforward == {"default": False}
