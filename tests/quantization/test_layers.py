"""LoRA over real bitsandbytes NF4 / FP4 / int8 base layers, on CPU."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from tiny_models import logits, tiny_llama

from lightning_peft import LoRA, apply_adapters, count_parameters, merge_adapters, unmerge_adapters
from lightning_peft.quantization import dequantize, is_quantized, quantize_linear, real_numel

MODES = ["nf4", "fp4", "int8"]


def quantize_all_linear(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Every decoder linear layer of a tiny Llama as bitsandbytes, the head kept in float."""
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantize_linear(module, mode))
    return model


@pytest.mark.parametrize("mode", MODES)
def test_quantize_linear_gives_the_bitsandbytes_layer_and_dequantize_inverts_it(mode):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    layer = quantize_linear(linear, mode)
    expected_type = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    assert isinstance(layer, expected_type) and is_quantized(layer)
    assert not any(p.requires_grad for p in layer.parameters())
    weight = dequantize(layer)
    assert weight.shape == (64, 128)
    relative = (weight - linear.weight).norm() / linear.weight.norm()
    assert 0 < relative < (0.02 if mode == "int8" else 0.15)
    x = torch.randn(4, 128)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ weight.T.float() + linear.bias, rtol=1e-3, atol=1e-3)


def test_a_4bit_weight_counts_as_the_parameters_it_encodes():
    float_model = tiny_llama()
    model = quantize_all_linear(tiny_llama(), "nf4")
    packed = model.model.layers[0].self_attn.q_proj.weight
    assert packed.numel() == 64 * 64 // 2 and real_numel(packed) == 64 * 64
    assert count_parameters(model).total == sum(p.numel() for p in float_model.parameters())


@pytest.mark.parametrize("mode", MODES)
def test_lora_over_a_quantized_base_starts_equal_and_trains_only_adapters(mode, input_ids):
    base = quantize_all_linear(tiny_llama(), mode)
    reference = logits(base, input_ids)
    model = apply_adapters(base, LoRA(rank=4, target_modules=["q_proj", "v_proj"]))
    assert torch.equal(logits(model, input_ids), reference)

    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_b.weight.normal_()  # as after a step; with B = 0, A's gradient is zero
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert layer.lora_a.weight.grad.abs().sum() > 0
    assert layer.lora_b.weight.grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("mode", MODES)
def test_merging_into_a_quantized_base_requantizes_and_reports_the_error(mode, input_ids):
    model = apply_adapters(quantize_all_linear(tiny_llama(), mode), LoRA(rank=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)  # an update the size of the weights
    layer = model.model.layers[0].self_attn.q_proj
    exact = dequantize(layer.base_layer).float() + layer.delta_weight()
    unmerged = logits(model, input_ids)

    report = merge_adapters(model)
    assert report.changed == 4 and 0 < report.max_abs_error < 0.1
    assert is_quantized(layer.base_layer)  # still 4-bit / 8-bit after the merge
    stored_error = (dequantize(layer.base_layer).float() - exact).abs().max().item()
    assert stored_error == pytest.approx(report.errors["model.layers.0.self_attn.q_proj"])
    merged = logits(model, input_ids)
    assert not torch.equal(merged, unmerged)  # rounding is real, and reported
    # Re-quantizing 4 layers costs less than quantizing the float base did in the first place.
    quantization_cost = relative_difference(
        logits(quantize_all_linear(tiny_llama(), mode), input_ids), logits(tiny_llama(), input_ids)
    )
    assert relative_difference(merged, unmerged) < quantization_cost

    unmerge_adapters(model)
    assert relative_difference(logits(model, input_ids), unmerged) < quantization_cost


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_dora_over_nf4_starts_equal_to_the_nf4_base(input_ids):
    model = apply_adapters(quantize_all_linear(tiny_llama(), "nf4"), LoRA(rank=4, use_dora=True, target_modules=["q_proj"]))
    assert torch.equal(logits(model, input_ids), logits(quantize_all_linear(tiny_llama(), "nf4"), input_ids))


def test_quantize_linear_refuses_bad_input():
    with pytest.raises(ValueError, match=r"quantization mode must be one of \('nf4', 'fp4', 'int8'\), got 'int4'"):
        quantize_linear(torch.nn.Linear(4, 4), "int4")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"needs a float nn.Linear or Conv1D, got Embedding"):
        quantize_linear(torch.nn.Embedding(4, 4))
