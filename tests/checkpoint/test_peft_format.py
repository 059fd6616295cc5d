"""The Hugging Face PEFT format both ways, checked against peft itself (the dev extra)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)

from lightning_peft import (
    IA3,
    AdapterConfigError,
    AdapterStateError,
    BitFit,
    BottleneckAdapter,
    LoRA,
    PrefixTuning,
    PromptTuning,
    apply_adapters,
)
from lightning_peft.checkpoint.peft_format import load_peft, save_peft
from lightning_peft.injection import adapter_parameter_names
from tests.snapshots import assert_model_unchanged, model_snapshot
from tests.tiny_models import VOCAB, tiny_gpt2, tiny_llama

OURS = {
    "lora": (tiny_llama, LoRA(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "rslora": (tiny_llama, LoRA(rank=4, alpha=8, target_modules="all-linear", use_rslora=True)),
    "dora": (
        tiny_llama,
        LoRA(rank=4, alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True),
    ),
    "lora-gpt2": (tiny_gpt2, LoRA(rank=4, target_modules=["c_attn", "c_fc"])),
    "ia3": (tiny_llama, IA3()),
    "prompt": (tiny_llama, PromptTuning(num_virtual_tokens=5)),
    "prefix": (tiny_llama, PrefixTuning(num_virtual_tokens=4, encoder_hidden_size=16)),
}
THEIRS = {
    "lora": (
        tiny_llama,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    ),
    "dora": (
        tiny_llama,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True, task_type="CAUSAL_LM"
        ),
    ),
    "lora-gpt2": (
        tiny_gpt2,
        LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"),
    ),
    "ia3": (tiny_llama, IA3Config(task_type="CAUSAL_LM")),
    "prompt": (tiny_llama, PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM")),
    "prefix": (tiny_llama, PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")),
}
VIRTUAL = {"prompt": 5}  # PEFT's logits include the soft prompt's positions; ours drop them


def perturb_(parameters) -> None:
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for param in parameters:
            param.add_(0.2 * torch.randn(param.shape, generator=generator))


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))


def peft_logits(model, tokens, method):
    logits = model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits
    return logits[:, VIRTUAL.get(method, 0) :]


@pytest.mark.parametrize("method", OURS)
def test_an_adapter_saved_here_loads_in_peft_with_the_same_logits(method, tokens, tmp_path):
    make, config = OURS[method]
    model = apply_adapters(make(), config)
    perturb_(model.get_parameter(n) for n in adapter_parameter_names(model))
    save_peft(model, tmp_path, base_model_name_or_path="tiny")
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    assert fields["base_model_name_or_path"] == "tiny" and fields["task_type"] == "CAUSAL_LM"

    theirs = PeftModel.from_pretrained(make(), tmp_path)
    with torch.no_grad():
        expected = model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits
        torch.testing.assert_close(
            peft_logits(theirs, tokens, method), expected, rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("method", THEIRS)
def test_an_adapter_saved_by_peft_loads_here_with_the_same_logits(method, tokens, tmp_path):
    make, config = THEIRS[method]
    theirs = get_peft_model(make(), config)
    perturb_(p for p in theirs.parameters() if p.requires_grad)
    theirs.save_pretrained(tmp_path)
    theirs.eval()

    ours = load_peft(make(), tmp_path)
    with torch.no_grad():
        expected = peft_logits(theirs, tokens, method)
        torch.testing.assert_close(
            ours(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits,
            expected,
            rtol=1e-5,
            atol=1e-5,
        )


def test_round_trip_under_another_name_and_into_existing_adapters(tokens, tmp_path):
    model = apply_adapters(tiny_llama(), LoRA(rank=4, target_modules=["q_proj"]), name="task")
    perturb_(model.get_parameter(n) for n in adapter_parameter_names(model))
    save_peft(model, tmp_path, adapter_name="task")
    fresh = apply_adapters(tiny_llama(), LoRA(rank=4, target_modules=["q_proj"]), name="task")
    load_peft(fresh, tmp_path, adapter_name="task")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=tokens).logits, model(input_ids=tokens).logits)
    wrong = apply_adapters(tiny_llama(), LoRA(rank=2, target_modules=["q_proj"]), name="task")
    with pytest.raises(AdapterConfigError, match=r"adapter 'task' whose \{'rank': 2.*differ"):
        load_peft(wrong, tmp_path, adapter_name="task")
    # Another alpha, same shapes: the file's tensors would be scaled otherwise. Refused.
    other_alpha = apply_adapters(
        tiny_llama(), LoRA(rank=4, alpha=4, target_modules=["q_proj"]), name="task"
    )
    before = model_snapshot(other_alpha)
    with pytest.raises(AdapterConfigError, match=r"'alpha': 4.*differ.*'alpha': 16"):
        load_peft(other_alpha, tmp_path, adapter_name="task")
    assert_model_unchanged(other_alpha, before)


def test_methods_without_a_peft_equivalent_and_bad_directories_are_refused(tmp_path):
    for config in (BitFit(), BottleneckAdapter()):
        model = apply_adapters(tiny_gpt2() if isinstance(config, BitFit) else tiny_llama(), config)
        with pytest.raises(AdapterConfigError, match="has no Hugging Face PEFT equivalent"):
            save_peft(model, tmp_path / "x")
    with pytest.raises(AdapterStateError, match="no adapter named 'other'"):
        save_peft(apply_adapters(tiny_llama(), LoRA()), tmp_path / "y", adapter_name="other")
    with pytest.raises(FileNotFoundError, match=r"has no adapter_config\.json"):
        load_peft(tiny_llama(), tmp_path / "missing")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "rank_pattern": {"q_proj": 8}})
    )
    (tmp_path / "odd" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(
        AdapterConfigError,
        match=r"options lightning_peft does not implement: rank_pattern=\{'q_proj': 8\}",
    ):
        load_peft(tiny_llama(), tmp_path / "odd")


def test_a_qlora_adapter_needs_its_nf4_base_and_load_peft_quantizes_in_the_same_call(
    tokens, tmp_path
):
    from lightning_peft.quantization import quantize_model

    trained = quantize_model(tiny_llama(init_std=0.3), "nf4")
    apply_adapters(trained, LoRA(rank=4, target_modules=["q_proj", "v_proj"]))
    perturb_(trained.get_parameter(n) for n in adapter_parameter_names(trained))
    save_peft(trained, tmp_path)
    with torch.no_grad():
        expected = trained(input_ids=tokens).logits
        on_nf4 = load_peft(tiny_llama(init_std=0.3), tmp_path, quantize="nf4")(input_ids=tokens)
        # The folder records its NF4 base: by default the float model is quantized so.
        recorded = load_peft(tiny_llama(init_std=0.3), tmp_path)(input_ids=tokens)
        with pytest.warns(UserWarning, match="trained over a nf4 base"):
            float_model = load_peft(tiny_llama(init_std=0.3), tmp_path, quantize=None)
        on_float = float_model(input_ids=tokens)
    assert torch.equal(on_nf4.logits, expected)  # quantization is deterministic
    assert torch.equal(recorded.logits, expected)
    assert (on_float.logits - expected).abs().max() > 1e-2  # another base: other logits
