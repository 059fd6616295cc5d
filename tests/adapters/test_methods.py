"""Behaviour particular to each method, beyond the contract suite in test_contract.py."""

from __future__ import annotations

import pytest
import torch

from lightning_peft import (
    IA3,
    AdapterConfigError,
    AdapterStateError,
    BitFit,
    BottleneckAdapter,
    LoRA,
    PrefixTuning,
    PromptTuning,
    Unfreeze,
    adapter_state_dict,
    apply_adapters,
    merge_adapters,
    unmerge_adapters,
)
from lightning_peft.adapters import fold_prefix_
from lightning_peft.errors import TargetModulesError, UnsupportedLayerError
from lightning_peft.injection import adapter_parameter_names
from lightning_peft.quantization import quantize_model
from tests.snapshots import refused_without_a_trace
from tests.tiny_models import VOCAB, tiny_bert, tiny_gpt2, tiny_llama


def randomize_(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name in adapter_parameter_names(model):
            param = model.get_parameter(name)
            param.copy_(1 + 0.3 * torch.randn_like(param))


def test_ia3_scales_key_value_outputs_and_the_feedforward_input(input_ids):
    model = apply_adapters(tiny_llama(bias=True), IA3())
    layer = model.model.layers[0]
    assert layer.self_attn.k_proj.vector.shape == (32, 1)  # l_k: one per key feature
    assert layer.mlp.down_proj.vector.shape == (1, 128)  # l_ff: one per inner activation
    x = torch.randn(3, 128)
    with torch.no_grad():
        layer.mlp.down_proj.vector.fill_(2.0)
        expected = layer.mlp.down_proj.base_layer(2 * x)
        torch.testing.assert_close(layer.mlp.down_proj(x), expected)


@pytest.mark.parametrize("base", ["fp32", "nf4"])
def test_ia3_merges_into_the_weights_and_back(base, input_ids):
    model = tiny_llama(bias=True)
    if base == "nf4":
        quantize_model(model, "nf4")
    apply_adapters(model, IA3())
    randomize_(model)
    weights = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("k_proj.bias")}
    with torch.no_grad():
        unmerged = model(input_ids=input_ids).logits
        report = merge_adapters(model)
        merged = model(input_ids=input_ids).logits
        assert merge_adapters(model).changed == 0  # merging twice changes nothing
    assert report.changed == 6
    tolerance = 1e-5 if base == "fp32" else 0.5
    torch.testing.assert_close(merged, unmerged, atol=tolerance, rtol=0)
    if base == "fp32":
        assert report.max_abs_error == 0.0
    else:
        assert 0 < report.max_abs_error < 0.1  # NF4 re-quantization, reported
    unmerge_adapters(model)
    for key, value in weights.items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_ia3_feedforward_modules_must_be_targets():
    with pytest.raises(
        AdapterConfigError, match=r"feedforward_modules must be among target_modules.*'mlp'"
    ):
        IA3(target_modules=["k_proj", "v_proj"], feedforward_modules=["mlp"])


def test_ia3_on_gpt2_fused_attention_and_mlp_projection(input_ids):
    model = apply_adapters(
        tiny_gpt2(),
        IA3(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
    )
    block = model.transformer.h[0]
    assert block.attn.c_attn.vector.shape == (192, 1)  # q, k and v of the fused projection
    assert block.mlp.c_proj.vector.shape == (1, 256)


def test_bottleneck_config_reports_every_problem():
    with pytest.raises(AdapterConfigError) as error:
        BottleneckAdapter(reduction_factor=0, placement="middle", activation="swish")
    message = str(error.value)
    assert "reduction_factor must be a positive int, got 0" in message
    assert "placement must be one of ('houlsby', 'pfeiffer'), got 'middle'" in message
    assert "activation must be one of ('relu', 'gelu', 'silu', 'tanh'), got 'swish'" in message


def test_bottleneck_placements_on_gpt2(input_ids):
    names = dict(attention_modules=["attn.c_proj"], feedforward_modules=["mlp.c_proj"])
    houlsby = apply_adapters(tiny_gpt2(), BottleneckAdapter(reduction_factor=16, **names))
    pfeiffer = apply_adapters(tiny_gpt2(), BottleneckAdapter(placement="pfeiffer", **names))
    assert {n.split(".adapter_")[0] for n in adapter_parameter_names(houlsby)} == {
        f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_proj", "mlp.c_proj")
    }
    assert {n.split(".adapter_")[0] for n in adapter_parameter_names(pfeiffer)} == {
        f"transformer.h.{i}.mlp.c_proj" for i in (0, 1)
    }
    assert houlsby.transformer.h[0].mlp.c_proj.adapter_down["default"].out_features == 4  # 64 / 16


def test_bitfit_says_so_when_the_model_has_no_bias():
    with pytest.raises(TargetModulesError, match=r"BitFit found no bias to train.*LlamaForCausal"):
        apply_adapters(tiny_llama(), BitFit())


def test_bitfit_trains_layer_norm_biases_too_and_leaves_weights_frozen():
    model = apply_adapters(tiny_gpt2(), BitFit())
    names = adapter_parameter_names(model)
    assert "transformer.h.0.ln_1.bias" in names and "transformer.ln_f.bias" in names
    assert all(n.endswith(".bias") for n in names)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("weight"))


def test_unfreeze_trains_a_new_head_next_to_adapters():
    model = apply_adapters(
        tiny_bert(), [LoRA(rank=2, target_modules=["query", "value"]), Unfreeze(["classifier"])]
    )
    state = adapter_state_dict(model)
    assert {"classifier.weight", "classifier.bias"} <= set(state)
    assert sum(k.startswith("classifier") for k in state) == 2
    with pytest.raises(AdapterConfigError, match=r"target_modules must name the modules to train"):
        Unfreeze()


def test_methods_that_wrap_the_same_layer_are_refused_before_any_change():
    model = tiny_llama()
    with refused_without_a_trace(
        model, TargetModulesError, match="IA3 and LoRA both select .*v_proj"
    ):
        apply_adapters(model, [LoRA(target_modules=["v_proj"]), IA3()])
    assert not adapter_parameter_names(model)  # untouched
    apply_adapters(model, [LoRA(target_modules=["q_proj"]), IA3()])
    assert len(adapter_parameter_names(model)) == 2 * (2 + 3)


def test_prompt_tuning_extends_labels_so_the_loss_covers_the_real_tokens(input_ids):
    base = tiny_llama()
    model = apply_adapters(tiny_llama(), PromptTuning(num_virtual_tokens=5))
    out = model(input_ids=input_ids, labels=input_ids)
    assert out.logits.shape == (2, 12, VOCAB)  # the prompt's positions are dropped
    # The loss scores every real token, the first one predicted from the prompt's last.
    prompt = model.prompt_tuning.prompt["default"].expand(2, -1, -1)
    embeds = torch.cat([prompt, base.get_input_embeddings()(input_ids)], 1)
    labels = torch.cat([torch.full((2, 5), -100), input_ids], 1)
    expected = base(inputs_embeds=embeds, labels=labels)
    torch.testing.assert_close(out.loss, expected.loss)
    torch.testing.assert_close(out.logits, expected.logits[:, 5:])


@pytest.fixture
def word_tokenizer(tmp_path) -> str:
    """A saved word-level tokenizer: classify -> 7, the -> 9, review -> 11."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "classify": 7, "the": 9, "review": 11}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(tmp_path)
    return str(tmp_path)


def test_prompt_tuning_text_init_uses_the_texts_token_embeddings(word_tokenizer):
    config = PromptTuning(
        num_virtual_tokens=5,
        init="text",
        init_text="classify the review",
        tokenizer_name_or_path=word_tokenizer,
    )
    model = apply_adapters(tiny_llama(), config)
    rows = torch.tensor([7, 9, 11, 7, 9])  # repeated to fill 5 virtual tokens
    torch.testing.assert_close(
        model.prompt_tuning.prompt["default"], model.get_input_embeddings().weight[rows]
    )
    with pytest.raises(
        AdapterConfigError, match="init='text' needs init_text and tokenizer_name_or_path"
    ):
        PromptTuning(init="text")


@pytest.mark.parametrize("config", [PromptTuning(), PrefixTuning()], ids=["prompt", "prefix"])
def test_virtual_token_methods_need_a_transformers_model(config):
    with pytest.raises(
        UnsupportedLayerError, match=r"needs a transformers model .* inside Sequential"
    ):
        apply_adapters(torch.nn.Sequential(torch.nn.Linear(4, 4)), config)
    model = apply_adapters(tiny_llama(), config)
    with refused_without_a_trace(model, AdapterConfigError, match="a model takes one"):
        apply_adapters(model, config)


def test_prefix_over_gpt2_equals_its_tokens_in_front_and_folding_keeps_outputs(input_ids):
    base = tiny_gpt2()
    model = apply_adapters(tiny_gpt2(), PrefixTuning(num_virtual_tokens=3))
    randomize_(model)
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
        assert fold_prefix_(model) == 1
        torch.testing.assert_close(model(input_ids=input_ids).logits, before, rtol=1e-5, atol=1e-5)
    assert adapter_parameter_names(model) == ["prefix_tuning.prefix.default"]
    assert model.prefix_tuning.prefix["default"].requires_grad

    front = torch.randint(0, VOCAB, (1, 3))
    with torch.no_grad():
        cache = base(input_ids=front, use_cache=True).past_key_values
        blocks = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]
        model.prefix_tuning.prefix["default"].copy_(
            torch.stack(blocks).permute(3, 0, 1, 2, 4).reshape(3, -1)
        )
        got = model(input_ids=input_ids).logits
        expected = base(input_ids=torch.cat([front.expand(2, -1), input_ids], 1)).logits[:, 3:]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(AdapterStateError, match="has no PrefixTuning prefix to fold"):
        fold_prefix_(tiny_gpt2())


def test_prefix_text_init_starts_as_the_base_with_that_text_in_front(word_tokenizer, input_ids):
    base = tiny_llama()
    config = PrefixTuning(
        num_virtual_tokens=4,
        reparametrize=False,
        init="text",
        init_text="classify the review",
        tokenizer_name_or_path=word_tokenizer,
    )
    model = apply_adapters(tiny_llama(), config)
    front = torch.tensor([[7, 9, 11, 7]]).expand(2, -1)
    with torch.no_grad():
        expected = base(input_ids=torch.cat([front, input_ids], 1)).logits[:, 4:]
        torch.testing.assert_close(model(input_ids=input_ids).logits, expected)
    with pytest.raises(
        AdapterConfigError,
        match="init='text' sets the prefix itself, so it needs reparametrize=False",
    ):
        PrefixTuning(init="text", init_text="x", tokenizer_name_or_path=word_tokenizer)
