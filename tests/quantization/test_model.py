"""quantize_model, dequantize_model and memory_report, without Lightning."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from lightning_peft import LoRA, apply_adapters
from lightning_peft.quantization import (
    dequantize_model,
    memory_report,
    optimizer_class,
    quantize_model,
    rebuild_optimizer,
)
from tests.tiny_models import logits, tiny_llama


def wide_mlp() -> torch.nn.Sequential:
    """Layers as wide as a small real model's, so constants are measured at realistic sizes."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        *[torch.nn.Linear(1024, 1024) for _ in range(4)], torch.nn.Linear(1024, 10)
    )


@pytest.mark.parametrize(
    ("mode", "double_quant", "low", "high"),
    [
        ("nf4", True, 4.12, 4.14),
        ("nf4", False, 4.49, 4.51),
        ("fp4", True, 4.12, 4.14),
        ("int8", False, 8.0, 8.04),
    ],
)
def test_quantized_weights_cost_the_bits_per_parameter_of_the_qlora_paper(
    mode, double_quant, low, high
):
    """QLoRA section 2: NF4 with double quantization is 4 + 0.127 bits per parameter."""
    model = quantize_model(wide_mlp(), mode, double_quant=double_quant)
    report = memory_report(model)
    assert report.quantized_parameters == 4 * 1024 * 1024
    assert low <= report.quantized_bits_per_parameter <= high
    assert "| quantized weights |" in report.table()


def test_quantize_model_keeps_the_head_and_skipped_modules_in_float():
    model = quantize_model(tiny_llama(), "nf4", skip_modules=["mlp.down_proj"])
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 12 and not any("down_proj" in n for n in quantized)
    assert type(model.lm_head) is torch.nn.Linear and model.is_loaded_in_4bit


def test_quantize_model_refuses_a_model_with_adapters():
    with pytest.raises(ValueError, match="quantize the base before attaching"):
        quantize_model(apply_adapters(tiny_llama(), LoRA()), "nf4")


def test_dequantize_model_gives_plain_linear_layers_computing_the_same(input_ids):
    model = quantize_model(tiny_llama(), "nf4")
    apply_adapters(model, LoRA(rank=4, target_modules=["q_proj"]))
    quantized_logits = logits(model, input_ids)
    dequantize_model(model)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj.base_layer) is torch.nn.Linear
    torch.testing.assert_close(logits(model, input_ids), quantized_logits, rtol=1e-4, atol=1e-5)


def test_memory_report_counts_adapters_gradients_and_optimizer_state(input_ids):
    model = apply_adapters(
        quantize_model(tiny_llama(), "nf4"), LoRA(rank=4, target_modules=["q_proj", "v_proj"])
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    report = memory_report(model, optimizer)
    adapter_bytes = 1792 * 4
    assert report.bytes["adapters"] == report.bytes["gradients"] == adapter_bytes
    assert (
        report.bytes["optimizer state"] == 2 * adapter_bytes + 8 * 4
    )  # exp_avg, exp_avg_sq, steps
    assert report.base_parameters == sum(p.numel() for p in tiny_llama().parameters())


def test_unknown_optimizer_names_are_refused_and_frozen_params_dropped():
    with pytest.raises(
        ValueError, match=r"optimizer must be one of \('paged_adamw_8bit'.*got 'lion'"
    ):
        optimizer_class("lion")
    model = apply_adapters(tiny_llama(), LoRA(rank=4, target_modules=["q_proj"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    rebuilt = rebuild_optimizer(optimizer, "adamw_8bit")
    assert type(rebuilt) is bnb.optim.AdamW8bit
    assert len(rebuilt.param_groups[0]["params"]) == 4
    assert (rebuilt.param_groups[0]["lr"], rebuilt.param_groups[0]["weight_decay"]) == (3e-4, 0.1)


def test_4bit_layers_share_their_constant_lookup_tables_and_compute_the_same(input_ids):
    """bitsandbytes keeps a copy of the 16-value NF4 map and the 256-value dynamic map per
    layer; quantize_model keeps one of each, which changes no output."""
    model = quantize_model(tiny_llama(), "nf4")
    states = [m.weight.quant_state for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(states) == 14
    assert len({s.code.data_ptr() for s in states}) == 1
    assert len({s.state2.code.data_ptr() for s in states}) == 1
    copies = quantize_model(tiny_llama(), "nf4")
    for module in copies.modules():  # give each layer its own tables again
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            state.code, state.state2.code = state.code.clone(), state.state2.code.clone()
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, copies(input_ids=input_ids).logits)
    assert memory_report(model).bytes["quantized weights"] == (
        memory_report(copies).bytes["quantized weights"] - 13 * (16 + 256) * 4
    )
