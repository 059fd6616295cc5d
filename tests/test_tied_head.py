"""LoRA on a tied output head: merging changes the head only, never the input embeddings."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from lightning_peft import LoRA, apply_adapters, merge_adapters
from lightning_peft.checkpoint.export import merge_and_export
from tests.tiny_models import VOCAB, tiny_llama
from tests.tolerances import reordering_tolerance


def tied_llama_with_a_trained_head_adapter() -> LlamaForCausalLM:
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    apply_adapters(model, LoRA(rank=4, target_modules=["lm_head"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
    return model


TOKENS = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))


def test_merging_a_tied_head_unties_it_and_leaves_the_embeddings_alone():
    model = tied_llama_with_a_trained_head_adapter()
    embeddings = model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        expected = model(input_ids=TOKENS).logits
    merge_adapters(model)
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    assert model.config.tie_word_embeddings is False
    with torch.no_grad():
        got = model(input_ids=TOKENS).logits
    torch.testing.assert_close(got, expected, **reordering_tolerance(expected, depth=2, width=64))


def test_the_merged_export_of_a_tied_head_reloads_untied_and_matches(tmp_path):
    model = tied_llama_with_a_trained_head_adapter()
    with torch.no_grad():
        expected = model(input_ids=TOKENS).logits
    merge_and_export(model, tmp_path / "merged")
    assert model.model.embed_tokens.weight is model.lm_head.base_layer.weight  # copy exported
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    with torch.no_grad():
        got = reloaded(input_ids=TOKENS).logits
    torch.testing.assert_close(got, expected, **reordering_tolerance(expected, depth=2, width=64))
