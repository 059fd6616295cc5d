"""LoRA's contracts over real (tiny) Llama, GPT-2 and BERT models."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from lightning_peft import (
    AdapterConfigError,
    LoRA,
    adapter_state_dict,
    apply_adapters,
    count_parameters,
    merge_adapters,
    unmerge_adapters,
)
from lightning_peft.adapters import LoRALinear
from lightning_peft.injection import adapter_modules
from tests.tiny_models import MODEL_FACTORIES, logits, tiny_gpt2, tiny_llama

VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "gaussian": {"init": "gaussian"},
}


def perturb_adapters(model: torch.nn.Module, seed: int = 3) -> None:
    """Give every adapter tensor a nonzero random value, as after some training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in adapter_state_dict(model).values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", MODEL_FACTORIES)
def test_adapted_model_starts_equal_to_base(arch, variant, input_ids):
    base = MODEL_FACTORIES[arch]()
    adapted = apply_adapters(MODEL_FACTORIES[arch](), LoRA(rank=4, **VARIANTS[variant]))
    assert any(True for _ in adapter_modules(adapted))
    assert torch.equal(logits(adapted, input_ids), logits(base, input_ids))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", MODEL_FACTORIES)
def test_merge_then_unmerge_restores_weights_and_merged_output_matches(arch, variant, input_ids):
    model = apply_adapters(MODEL_FACTORIES[arch](), LoRA(rank=4, **VARIANTS[variant]))
    perturb_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged_logits = logits(model, input_ids)
    assert not torch.allclose(unmerged_logits, logits(MODEL_FACTORIES[arch](), input_ids))

    report = merge_adapters(model)
    assert report.changed == len(list(adapter_modules(model))) and report.unchanged == 0
    assert report.max_abs_error == 0.0  # float32 base: no storage rounding
    torch.testing.assert_close(logits(model, input_ids), unmerged_logits, rtol=1e-5, atol=1e-5)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "merging must write the update into the base weights"

    unmerge_adapters(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6, msg=key)
    torch.testing.assert_close(logits(model, input_ids), unmerged_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_merging_twice_is_a_no_op(variant, input_ids):
    model = apply_adapters(tiny_llama(), LoRA(rank=4, **VARIANTS[variant]))
    perturb_adapters(model)
    merge_adapters(model)
    once = {k: v.clone() for k, v in model.state_dict().items()}
    report = merge_adapters(model)
    assert (report.changed, report.unchanged) == (0, len(once and list(adapter_modules(model))))
    for key, value in model.state_dict().items():
        assert torch.equal(value, once[key]), key
    unmerge_adapters(model)
    assert unmerge_adapters(model).changed == 0


def test_update_is_alpha_over_rank_b_a_x():
    """h = W0 x + (alpha / r) B A x on a bare nn.Linear, checked by hand."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = LoRA(rank=2, alpha=3).wrap(base)
    torch.nn.init.normal_(layer.lora_b.weight)
    x = torch.randn(4, 6)
    expected = base(x) + (3 / 2) * x @ layer.lora_a.weight.T @ layer.lora_b.weight.T
    torch.testing.assert_close(layer(x), expected)
    rs_layer = LoRA(rank=4, alpha=3, use_rslora=True).wrap(torch.nn.Linear(6, 5))
    assert rs_layer.scaling == pytest.approx(3 / 2)  # alpha / sqrt(rank)


def test_dora_merged_weight_has_the_learned_row_norms():
    torch.manual_seed(0)
    layer = LoRA(rank=2, use_dora=True).wrap(torch.nn.Linear(8, 3))
    with torch.no_grad():
        layer.lora_b.weight.normal_()
        layer.lora_magnitude["default"].copy_(torch.tensor([0.5, 2.0, 3.0]))
    x = torch.randn(5, 8)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(
        torch.linalg.norm(layer.base_layer.weight, dim=1), torch.tensor([0.5, 2.0, 3.0])
    )
    torch.testing.assert_close(layer(x), unmerged)


def test_gpt2_conv1d_layers_are_wrapped_in_their_transposed_orientation(input_ids):
    model = apply_adapters(tiny_gpt2(), LoRA(rank=4, target_modules=["c_attn"]))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and isinstance(layer.base_layer, Conv1D)
    assert layer.lora_a.weight.shape == (4, 64) and layer.lora_b.weight.shape == (192, 4)
    perturb_adapters(model)
    x = torch.randn(3, 64)
    expected = (
        x @ layer.base_layer.weight + layer.base_layer.bias + layer.delta_weight().matmul(x.T).T
    )
    torch.testing.assert_close(layer(x), expected)


def test_only_adapter_tensors_are_trainable_and_counted():
    model = apply_adapters(tiny_llama(), LoRA(rank=4, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model))
    # q_proj 64->64 and v_proj 64->32 in 2 layers: r*(in+out) each.
    expected = 2 * (4 * (64 + 64) + 4 * (64 + 32))
    count = count_parameters(model)
    assert count.trainable == expected == 1792
    assert count.total == sum(p.numel() for p in tiny_llama().parameters()) + expected
    assert "trainable 1,792" in str(count)


def test_adapter_state_dict_holds_exactly_the_adapter_tensors():
    model = apply_adapters(
        tiny_llama(), LoRA(rank=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    )
    expected = {
        f"model.layers.{i}.self_attn.{proj}.{name}"
        for i in range(2)
        for proj in ("q_proj", "v_proj")
        for name in ("lora_A.default.weight", "lora_B.default.weight", "lora_magnitude.default")
    }
    assert set(adapter_state_dict(model)) == expected
    assert expected <= set(model.state_dict())


def test_base_state_dict_keys_are_unchanged_by_wrapping():
    base_state = tiny_llama(seed=5).state_dict()
    adapted = apply_adapters(tiny_llama(seed=0), LoRA(rank=4))
    adapter_keys = set(adapter_state_dict(adapted))
    assert set(adapted.state_dict()) - adapter_keys == set(base_state)
    result = adapted.load_state_dict(base_state, strict=False)
    assert set(result.missing_keys) == adapter_keys and result.unexpected_keys == []
    for key, value in base_state.items():
        assert torch.equal(adapted.state_dict()[key], value), key


def test_dropout_only_acts_in_training():
    torch.manual_seed(0)
    layer = LoRA(rank=2, dropout=0.5).wrap(torch.nn.Linear(16, 4))
    torch.nn.init.normal_(layer.lora_b.weight)
    x = torch.randn(8, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, r"rank must be a positive int, got 0"),
        ({"rank": 2.5}, r"rank must be a positive int, got 2.5"),
        ({"alpha": 0}, r"alpha must be a positive finite number, got 0"),
        ({"alpha": -1.0}, r"alpha must be a positive finite number, got -1.0"),
        ({"alpha": float("nan")}, r"alpha must be a positive finite number, got nan"),
        ({"alpha": float("inf")}, r"alpha must be a positive finite number, got inf"),
        ({"use_rslora": "no"}, r"use_rslora must be True or False, got 'no'"),
        ({"use_dora": 1}, r"use_dora must be True or False, got 1"),
        ({"dropout": float("nan")}, r"dropout must be in \[0, 1\), got nan"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\), got -0.1"),
        (
            {"init": "xavier"},
            r"init must be one of \('kaiming', 'gaussian', 'loftq'\), got 'xavier'",
        ),
        ({"target_modules": "q_proj("}, r"target_modules is not a valid regular expression"),
        ({"target_modules": ["q_proj", 3]}, r"target_modules must be a regex string"),
    ],
)
def test_invalid_config_is_refused_with_the_value(kwargs, message):
    with pytest.raises(AdapterConfigError, match=message):
        LoRA(**kwargs)


def test_every_config_problem_is_reported_at_once():
    with pytest.raises(ValueError, match=r"(?s)rank must be.*alpha must be.*dropout must be"):
        LoRA(rank=-1, alpha=0, dropout=2)


def test_config_is_frozen_and_normalizes_target_lists():
    config = LoRA(target_modules=["q_proj", "v_proj"])
    assert config.target_modules == ("q_proj", "v_proj")
    with pytest.raises(AttributeError):
        config.rank = 4  # type: ignore[misc]


def test_the_wrapper_answers_for_its_base_layer_attributes():
    model = apply_adapters(tiny_llama(), LoRA(rank=4, target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight is layer.base_layer.weight and layer.in_features == 64
    with pytest.raises(AttributeError):
        layer.no_such_attribute  # noqa: B018


def casts_of(x: torch.Tensor, out: torch.Tensor) -> int:
    """How many dtype casts of ``x`` the autograd graph of ``out`` holds (each cast of a
    tensor that requires grad is a ``ToCopyBackward0`` node whose input is ``x``'s node)."""
    seen, stack, casts = set(), [out.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        inputs = [n for n, _ in node.next_functions if n is not None]
        if node.name() == "ToCopyBackward0" and x.grad_fn in inputs:
            casts += 1
        stack.extend(inputs)
    return casts


@pytest.mark.parametrize("cast_once", [True, False])
def test_under_autocast_the_input_is_cast_once_and_the_result_is_what_autocast_gives(
    cast_once, monkeypatch
):
    from lightning_peft.adapters.lora import LoRALinear

    if not cast_once:  # what the layer would do without it: base and adapter cast x each
        monkeypatch.setattr(LoRALinear, "_cast_once_for_autocast", lambda self, x: x)
    torch.manual_seed(0)
    layer = LoRA(rank=2, alpha=4).wrap(torch.nn.Linear(16, 8))
    torch.nn.init.normal_(layer.lora_b.weight)
    # An activation, as a layer's input is (autocast caches the casts of leaf tensors only).
    x = torch.randn(3, 16, requires_grad=True) * 1.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert casts_of(x, out) == (1 if cast_once else 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = layer.base_layer(x)
        update = torch.nn.functional.linear(
            torch.nn.functional.linear(x, layer.lora_a.weight), layer.lora_b.weight
        )
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), (base + 2.0 * update).float(), rtol=2e-2, atol=2e-2)
