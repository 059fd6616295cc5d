"""merge_and_export: the adapted model as a plain transformers checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_peft import IA3, AdapterConfigError, LoRA, PromptTuning, apply_adapters
from lightning_peft.checkpoint.export import merge_and_export
from lightning_peft.injection import adapter_parameter_names
from lightning_peft.quantization import quantize_model
from tests.tiny_models import VOCAB, tiny_llama
from tests.tolerances import reordering_tolerance


def trained(base: str) -> torch.nn.Module:
    model = tiny_llama(init_std=0.3)
    if base == "nf4":
        quantize_model(model, "nf4")
    apply_adapters(
        model,
        [
            LoRA(rank=4, target_modules=["q_proj", "v_proj"]),
            IA3(target_modules=["k_proj", "down_proj"]),
        ],
    )
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name in adapter_parameter_names(model):
            param = model.get_parameter(name)
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model


@pytest.mark.parametrize("base", ["fp32", "nf4"])
def test_the_merged_export_reloads_with_plain_transformers_and_matches(base, tmp_path):
    model = trained(base)
    tokens = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
    report = merge_and_export(model, tmp_path / "merged")
    assert report.changed == 2 * (2 + 2)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(reloaded.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and "lightning" not in json.dumps(config)
    with torch.no_grad():
        got = reloaded(input_ids=tokens).logits
    # The NF4 model computes with dequantized weights, so the float export matches it too.
    torch.testing.assert_close(got, expected, **reordering_tolerance(expected, depth=2, width=64))
    # The model passed in is untouched: still adapted, still computing the same.
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens).logits, expected)


def test_methods_that_cannot_merge_are_refused_before_writing(tmp_path):
    model = apply_adapters(tiny_llama(), PromptTuning(num_virtual_tokens=3))
    with pytest.raises(
        AdapterConfigError,
        match="SoftPrompt cannot be merged into the weights; save those adapters with save_peft",
    ):
        merge_and_export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
