"""An eval pass leaves a 4-bit base exactly as it was, on every CPU.

bitsandbytes 0.50 repacks a 4-bit weight in place during an eval-mode, no-grad forward on a
CPU with AVX512-BF16 (see ``keep_4bit_storage_exact_``). These tests make the layers believe
the instruction is there on any machine (``cpu_paths.force_avx512bf16``), so they reach that
code path here and in CI alike: without the package's guard they fail on a CPU with
AVX512-BF16 (the storage changes) and on one without (the repacked layer has no kernel).
"""

from __future__ import annotations

import pytest
import torch

from lightning_peft import LoRA, apply_adapters, merge_adapters
from lightning_peft.checkpoint.metadata import fingerprint_frozen
from lightning_peft.quantization import (
    dense_weight,
    memory_report,
    quantize_linear,
    quantize_model,
)
from tests import cpu_paths
from tests.tiny_models import tiny_llama


@pytest.fixture
def layers_see_avx512bf16():
    import bitsandbytes.functional

    original = bitsandbytes.functional.has_avx512bf16
    cpu_paths.force_avx512bf16(True)
    yield
    bitsandbytes.functional.has_avx512bf16 = original
    import bitsandbytes.nn.modules

    bitsandbytes.nn.modules.has_avx512bf16 = original


def storage(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every frozen tensor of ``model`` with the 4-bit quantization state, as saved."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_storage(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype, key
        assert torch.equal(before[key], after[key]), key


def lora_gradients(model: torch.nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def eval_pass(model: torch.nn.Module, input_ids: torch.Tensor) -> None:
    """What a validation loop or a sanity check does."""
    model.eval()
    with torch.no_grad():
        model(input_ids=input_ids)


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_a_quantized_layer_keeps_its_storage_through_an_eval_pass(layers_see_avx512bf16, mode):
    torch.manual_seed(0)
    layer = quantize_linear(torch.nn.Linear(128, 64), mode)
    assert layer.support_avx512bf16_for_cpu is False  # the guard, on a layer that saw it
    before = storage(layer)
    weight = dense_weight(layer)
    layer.eval()
    with torch.no_grad():
        output = layer(torch.randn(3, 128))
    assert_same_storage(before, storage(layer))
    assert layer.weight.quant_state.nested  # double quantization kept
    assert torch.equal(dense_weight(layer), weight)
    assert output.shape == (3, 64)


def test_a_layer_repacked_before_the_guard_is_unpacked_when_adapters_attach():
    """A 4-bit layer a forward already repacked (an eval pass before ``apply_adapters``) is
    back on the standard layout, which training needs, once adapters are attached."""
    import bitsandbytes.functional as bnb_functional

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        quantize_linear(torch.nn.Linear(128, 64), "nf4", double_quant=False)
    )
    reference = dense_weight(model[0]).clone()
    # What bitsandbytes' forward does on an AVX512-BF16 CPU, done by hand so it happens on any.
    weight = model[0].weight
    weight.data, weight.quant_state = bnb_functional._convert_weight_packed_for_cpu(
        weight.data, weight.quant_state
    )
    assert weight.quant_state.packing_format_for_cpu

    apply_adapters(model, LoRA(rank=2, target_modules=["0"]))
    base = model[0].base_layer
    assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
    assert base.weight.dtype == torch.uint8 and base.weight.shape == (64 * 128 // 2, 1)
    # Without double quantization absmax was float32; the packed copy rounded it to bf16.
    torch.testing.assert_close(dense_weight(base), reference, rtol=2**-8, atol=0)


@pytest.mark.parametrize("bias", [False, True], ids=["llama", "with-biases"])
def test_training_after_an_eval_pass_is_training_before_it(layers_see_avx512bf16, bias):
    """Fingerprint, every stored tensor, bits per weight, LoRA gradients and the merged
    weights are the same before and after a validation-style pass."""
    model = quantize_model(tiny_llama(bias=bias), "nf4")
    apply_adapters(model, LoRA(rank=4, target_modules="all-linear"))
    with torch.no_grad():  # B != 0, so the adapters take part in the gradients below
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    input_ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    before_storage, before_print = storage(model), fingerprint_frozen(model)
    before_bits = memory_report(model).quantized_bits_per_parameter
    before_grads = lora_gradients(model, input_ids)

    eval_pass(model, input_ids)

    assert fingerprint_frozen(model) == before_print
    assert_same_storage(before_storage, storage(model))
    assert memory_report(model).quantized_bits_per_parameter == before_bits
    after_grads = lora_gradients(model, input_ids)  # the bias case raised here before the guard
    assert after_grads.keys() == before_grads.keys()
    for name in before_grads:
        assert torch.equal(after_grads[name], before_grads[name]), name
    merged_before = merge_adapters(model)
    assert merged_before.changed > 0
