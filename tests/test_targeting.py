"""Which modules get adapters, and the errors when a pattern is wrong."""

from __future__ import annotations

import pytest
import torch

from lightning_peft import LoRA, apply_adapters
from lightning_peft.adapters import LoRALinear
from lightning_peft.errors import TargetModulesError, UnsupportedLayerError
from lightning_peft.targeting import find_targets
from tests.snapshots import refused_without_a_trace
from tests.tiny_models import tiny_bert, tiny_gpt2, tiny_llama


def wrapped(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def test_suffixes_select_by_name_end():
    model = apply_adapters(tiny_llama(), LoRA(target_modules=["q_proj", "mlp.down_proj"]))
    assert wrapped(model) == [
        f"model.layers.{i}.{name}"
        for i in range(2)
        for name in ("self_attn.q_proj", "mlp.down_proj")
    ]


def test_a_string_is_a_regex_over_the_full_name():
    model = apply_adapters(
        tiny_llama(), LoRA(target_modules=r"model\.layers\.1\.self_attn\.[kv]_proj")
    )
    assert wrapped(model) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]


@pytest.mark.parametrize(
    ("factory", "head", "count"),
    [(tiny_llama, "lm_head", 14), (tiny_gpt2, "lm_head", 8), (tiny_bert, "classifier", 13)],
    ids=["llama", "gpt2", "bert"],
)
def test_all_linear_leaves_the_output_head_alone(factory, head, count):
    model = apply_adapters(factory(), LoRA(target_modules="all-linear"))
    names = wrapped(model)
    assert len(names) == count and head not in names


def test_all_linear_on_a_plain_torch_model_skips_the_last_layer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    assert find_targets(model, "all-linear") == ["0"]


def test_exclusions_apply_after_targets():
    model = apply_adapters(
        tiny_llama(), LoRA(target_modules=["q_proj"], exclude_modules=["layers.0.self_attn.q_proj"])
    )
    assert wrapped(model) == ["model.layers.1.self_attn.q_proj"]


def test_a_suffix_matching_nothing_lists_the_closest_names_and_touches_nothing():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with refused_without_a_trace(
        model, TargetModulesError, match=r"'q_prj' matched no module; closest module names: q_proj"
    ):
        apply_adapters(model, LoRA(target_modules=["v_proj", "q_prj"]))
    assert wrapped(model) == []
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_regex_matching_nothing_hints_at_the_list_form():
    with pytest.raises(
        TargetModulesError, match=r"(?s)'q_proj' matched no module.*target_modules=\['q_proj'\]"
    ):
        apply_adapters(tiny_llama(), LoRA(target_modules="q_proj"))


def test_excluding_every_match_is_refused():
    with pytest.raises(
        TargetModulesError, match=r"exclude_modules=\('q_proj',\) removed every module"
    ):
        apply_adapters(tiny_llama(), LoRA(target_modules=["q_proj"], exclude_modules=["q_proj"]))


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            "norm",
            r"(?s)LoRA cannot wrap.*model\.norm \(LlamaRMSNorm\).*LoRA wraps these layer types: "
            r"Linear, .*Embedding, Conv1d, Conv2d, Conv3d, MultiheadAttention",
        ),
        (
            "self_attn",
            r"(?s)self_attn \(LlamaAttention\).*linear layers inside instead, e.g\. "
            r"model\.layers\.0\.self_attn\.q_proj",
        ),
    ],
)
def test_a_layer_lora_cannot_wrap_is_named(target, message):
    model = tiny_llama()
    with refused_without_a_trace(model, UnsupportedLayerError, match=message):
        apply_adapters(model, LoRA(target_modules=[target]))
    assert wrapped(model) == []


def test_an_adapted_layer_is_not_wrapped_twice():
    model = apply_adapters(tiny_llama(), LoRA(target_modules=["q_proj"]))
    with refused_without_a_trace(
        model,
        TargetModulesError,
        match=r"model\.layers\.0\.self_attn\.q_proj already carries an adapter named 'default'",
    ):
        apply_adapters(model, LoRA(target_modules=["q_proj"]))
    # "all-linear" skips layers that already have an adapter (and the adapters' own layers).
    apply_adapters(model, LoRA(target_modules="all-linear"))
    assert len(wrapped(model)) == 14
    assert type(model.model.layers[0].self_attn.q_proj.base_layer) is torch.nn.Linear


def test_adapter_name_must_be_an_identifier():
    with pytest.raises(
        ValueError, match=r"adapter name must be a Python identifier, got 'my adapter'"
    ):
        apply_adapters(tiny_llama(), LoRA(), name="my adapter")
