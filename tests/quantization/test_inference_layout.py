"""bitsandbytes' fast CPU layout for a model that only infers: repacked on purpose, and the
layout training saw given back exactly (codes, constants, fingerprint, outputs) whenever it
is asked for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_peft.checkpoint.metadata import fingerprint_frozen
from lightning_peft.quantization import (
    cpu_inference_layout_available,
    pack_for_cpu_inference_,
    quantize_model,
    standard_layout,
    unpack_from_cpu_inference_,
)
from tests.tiny_models import VOCAB, tiny_llama


def _kernel_runs_here() -> bool:
    """bitsandbytes registers its fast kernel only where the CPU really has AVX512-BF16, and
    the package uses it only where bitsandbytes says so (tests/cpu_paths may force either)."""
    cpuinfo = Path("/proc/cpuinfo")
    real = cpuinfo.is_file() and "avx512_bf16" in cpuinfo.read_text()
    return real and cpu_inference_layout_available()


@pytest.fixture
def packing_allowed(monkeypatch):
    """Packing is pure tensor work: allowed here whatever the CPU (no packed forward runs)."""
    import bitsandbytes.functional

    monkeypatch.setattr(bitsandbytes.functional, "has_avx512bf16", lambda: True)


def quantized(mode: str = "nf4") -> torch.nn.Module:
    model = tiny_llama(0)
    quantize_model(model, mode)
    return model


def packed_layers(model: torch.nn.Module) -> int:
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    return sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", 0)) for m in layers)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
def test_the_standard_layout_comes_back_exactly(mode, packing_allowed):
    model = quantized(mode)
    before, fingerprint = snapshot(model), fingerprint_frozen(model)
    assert pack_for_cpu_inference_(model) == 14  # every 4-bit layer of the tiny Llama
    assert packed_layers(model) == 14
    with standard_layout(model):
        assert packed_layers(model) == 0
        assert fingerprint_frozen(model) == fingerprint
        assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())
    assert packed_layers(model) == 14  # packed again after
    unpack_from_cpu_inference_(model)
    assert fingerprint_frozen(model) == fingerprint
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())


def test_after_bitsandbytes_own_unpacking_the_constants_are_restored(packing_allowed):
    model = quantized()
    before = snapshot(model)
    pack_for_cpu_inference_(model)
    model.state_dict()  # bitsandbytes unpacks in place here, its constants rounded to bf16
    unpack_from_cpu_inference_(model)
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())


def test_nothing_is_repacked_where_the_cpu_lacks_the_kernel(monkeypatch):
    import bitsandbytes.functional

    monkeypatch.setattr(bitsandbytes.functional, "has_avx512bf16", lambda: False)
    model = quantized()
    before = snapshot(model)
    assert pack_for_cpu_inference_(model) == 0
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())


def test_the_fast_layout_computes_in_bfloat16_and_the_standard_one_as_before():
    if not _kernel_runs_here():
        pytest.skip("bitsandbytes' fast CPU 4-bit kernel needs AVX512-BF16")
    model = quantized().eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = model(input_ids=ids).logits
        pack_for_cpu_inference_(model)
        fast = model(input_ids=ids).logits
        with standard_layout(model):
            assert torch.equal(model(input_ids=ids).logits, exact)
    # Inputs and constants rounded to bfloat16 (8 significant bits, 2^-9 relative each),
    # through two layers of a few matmuls each: within 2^-5 of the largest logit.
    assert not torch.equal(fast, exact)
    assert (fast - exact).abs().max() <= 2**-5 * exact.abs().max()


def test_a_packed_layer_refuses_to_train_and_saves_and_merges_exactly(packing_allowed):
    from lightning_peft.errors import AdapterStateError
    from lightning_peft.quantization import dense_weight

    model = quantized()
    layer = model.model.layers[0].self_attn.q_proj
    before, dense = snapshot(model), dense_weight(layer).clone()
    pack_for_cpu_inference_(model)
    with pytest.raises(AdapterStateError, match="no backward: call lightning_peft"):
        model.train()(input_ids=torch.tensor([[1, 2, 3]]))
    # state_dict() and a dense read give the standard layout back first, exactly (bitsandbytes'
    # own unpacking would round the constants).
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())
    assert packed_layers(model) == 0
    pack_for_cpu_inference_(model)
    assert torch.equal(dense_weight(layer), dense) and packed_layers(model) == 13


def test_guarding_a_repacked_model_for_training_unpacks_it_exactly(packing_allowed):
    from lightning_peft.quantization import keep_4bit_storage_exact_

    model = quantized()
    before = snapshot(model)
    pack_for_cpu_inference_(model)
    assert keep_4bit_storage_exact_(model) == 14  # as quantize_model and the callback do
    assert packed_layers(model) == 0
    ids = torch.tensor([[1, 2, 3]])
    model.train()(input_ids=ids)  # the inference-only guard went with the packing
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())
