"""LoRA over real bitsandbytes NF4 / FP4 / int8 base layers, on CPU."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from lightning_peft import LoRA, apply_adapters, count_parameters, merge_adapters, unmerge_adapters
from lightning_peft.quantization import dense_weight, is_quantized, quantize_linear, real_numel
from tests.tiny_models import logits, tiny_llama

MODES = ["nf4", "fp4", "int8"]


@pytest.fixture
def input_ids(input_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    return input_ids.to(device)


def quantize_all_linear(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Every decoder linear layer of a tiny Llama as bitsandbytes, the head kept in float."""
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantize_linear(module, mode))
    return model


@pytest.mark.parametrize("mode", MODES)
def test_quantize_linear_gives_the_bitsandbytes_layer_and_dequantize_inverts_it(mode, device):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64, device=device)
    layer = quantize_linear(linear, mode)
    expected_type = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    assert isinstance(layer, expected_type) and is_quantized(layer)
    assert not any(p.requires_grad for p in layer.parameters())
    weight = dense_weight(layer)
    assert weight.shape == (64, 128)
    relative = (weight - linear.weight).norm() / linear.weight.norm()
    assert 0 < relative < (0.02 if mode == "int8" else 0.15)
    x = torch.randn(4, 128, device=device)
    with torch.no_grad():
        output = layer(x)
    # LLM.int8 on CUDA also quantizes the activations; elsewhere the layer computes x W^T.
    tolerance = 0.02 if mode == "int8" and device.type == "cuda" else 1e-4
    assert relative_difference(output, x @ weight.T.float() + linear.bias) < tolerance


def test_a_4bit_weight_counts_as_the_parameters_it_encodes(device):
    float_model = tiny_llama().to(device)
    model = quantize_all_linear(tiny_llama().to(device), "nf4")
    packed = model.model.layers[0].self_attn.q_proj.weight
    assert packed.numel() == 64 * 64 // 2 and real_numel(packed) == 64 * 64
    assert count_parameters(model).total == sum(p.numel() for p in float_model.parameters())


@pytest.mark.parametrize("mode", MODES)
def test_lora_over_a_quantized_base_starts_equal_and_trains_only_adapters(mode, device, input_ids):
    base = quantize_all_linear(tiny_llama().to(device), mode)
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
def test_merging_into_a_quantized_base_requantizes_and_reports_the_error(mode, device, input_ids):
    model = apply_adapters(
        quantize_all_linear(tiny_llama().to(device), mode),
        LoRA(rank=4, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)  # an update the size of the weights
    layer = model.model.layers[0].self_attn.q_proj
    exact = dense_weight(layer.base_layer).float() + layer.delta_weight()
    unmerged = logits(model, input_ids)

    report = merge_adapters(model)
    assert report.changed == 4 and 0 < report.max_abs_error < 0.1
    assert is_quantized(layer.base_layer)  # still 4-bit / 8-bit after the merge
    stored_error = (dense_weight(layer.base_layer).float() - exact).abs().max().item()
    assert stored_error == pytest.approx(report.errors["model.layers.0.self_attn.q_proj"])
    merged = logits(model, input_ids)
    assert not torch.equal(merged, unmerged)  # rounding is real, and reported
    # Re-quantizing 4 layers costs about what quantizing the float base did in the first place
    # (less for 4-bit; for LLM.int8 on CUDA both are dominated by its activation rounding).
    quantization_cost = relative_difference(
        logits(quantize_all_linear(tiny_llama().to(device), mode), input_ids),
        logits(tiny_llama().to(device), input_ids),
    )
    assert relative_difference(merged, unmerged) < 1.5 * quantization_cost

    unmerge_adapters(model)
    assert relative_difference(logits(model, input_ids), unmerged) < 1.5 * quantization_cost


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_dora_over_nf4_starts_equal_to_the_nf4_base(device, input_ids):
    model = apply_adapters(
        quantize_all_linear(tiny_llama().to(device), "nf4"),
        LoRA(rank=4, use_dora=True, target_modules=["q_proj"]),
    )
    assert torch.equal(
        logits(model, input_ids),
        logits(quantize_all_linear(tiny_llama().to(device), "nf4"), input_ids),
    )


def test_quantize_linear_refuses_bad_input():
    with pytest.raises(
        ValueError, match=r"quantization mode must be one of \('nf4', 'fp4', 'int8'\), got 'int4'"
    ):
        quantize_linear(torch.nn.Linear(4, 4), "int4")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"needs a float nn.Linear or Conv1D, got Embedding"):
        quantize_linear(torch.nn.Embedding(4, 4))
