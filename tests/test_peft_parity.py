"""With the same tensors, our LoRA / rsLoRA / DoRA compute what Hugging Face PEFT computes."""

from __future__ import annotations

import pytest
import torch

from lightning_peft import (
    LoRA,
    adapter_state_dict,
    apply_adapters,
    load_adapter_state_dict,
    merge_adapters,
)
from tests.tiny_models import logits, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft", reason="peft comes with the dev extra")

CASES = {
    "llama-linear": (tiny_llama, ["q_proj", "v_proj", "down_proj"], False),
    "gpt2-conv1d": (tiny_gpt2, ["c_attn", "c_fc"], True),
}
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


def peft_names_to_ours(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's in-memory adapter tensors, renamed to our keys."""
    renamed = {}
    for name, param in peft_model.named_parameters():
        if "lora_" not in name:
            continue
        name = name.removeprefix("base_model.model.")
        name = name.replace("lora_magnitude_vector.default.weight", "lora_magnitude.default")
        renamed[name] = param.detach()
    return renamed


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES)
def test_same_adapter_tensors_give_the_same_logits_as_peft(case, variant, input_ids):
    factory, targets, fan_in_fan_out = CASES[case]
    flags = VARIANTS[variant]
    # init_lora_weights=False: PEFT draws B at random too, so the outputs differ from the base.
    peft_config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        init_lora_weights=False,
        **flags,
    )
    peft_model = peft.get_peft_model(factory(), peft_config).eval()
    ours = apply_adapters(factory(), LoRA(rank=4, alpha=8, target_modules=targets, **flags))
    load_adapter_state_dict(ours, peft_names_to_ours(peft_model))

    expected = logits(peft_model, input_ids)
    assert not torch.allclose(expected, logits(factory(), input_ids), atol=1e-3)
    torch.testing.assert_close(logits(ours, input_ids), expected, rtol=1e-5, atol=1e-6)

    merge_adapters(ours)
    peft_model.merge_adapter()
    torch.testing.assert_close(
        logits(ours, input_ids), logits(peft_model, input_ids), rtol=1e-5, atol=1e-6
    )


def test_trainable_parameter_count_matches_peft():
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=8, target_modules=targets))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    ours = apply_adapters(tiny_llama(), LoRA(rank=8, target_modules=targets))
    assert sum(t.numel() for t in adapter_state_dict(ours).values()) == trainable


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["gqa-llama", "gpt2"])
def test_reparametrized_prefix_has_peft_trainable_count(build):
    from lightning_peft import PrefixTuning, count_parameters

    ours = apply_adapters(build(), PrefixTuning(num_virtual_tokens=4))
    theirs = peft.get_peft_model(
        build(),
        peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True
        ),
    )
    expected = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert count_parameters(ours).trainable == expected
