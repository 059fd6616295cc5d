"""Prompt and prefix tuning on encoder-decoder models (T5, Whisper): what PEFT computes, in
training and in generate, with PEFT files both ways."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from transformers import (
    T5Config,
    T5ForConditionalGeneration,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from lightning_peft import (
    PrefixTuning,
    PromptTuning,
    apply_adapters,
    count_parameters,
    load_peft,
    save_peft,
)
from lightning_peft.injection import adapter_parameter_names
from tests.tiny_models import peft_or_skip


def tiny_t5(layers: int = 2) -> T5ForConditionalGeneration:
    """A T5 whose greedy outputs depend on its input (a larger init than T5's own); PEFT
    reads the decoder's depth from the encoder's, so both have ``layers``."""
    torch.manual_seed(0)
    config = T5Config(
        d_model=32,
        d_ff=64,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=4,
        d_kv=8,
        vocab_size=100,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        initializer_factor=3.0,
        dropout_rate=0.0,
    )
    return T5ForConditionalGeneration(config).eval()


def tiny_whisper() -> WhisperForConditionalGeneration:
    torch.manual_seed(0)
    config = WhisperConfig(
        d_model=32,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        vocab_size=100,
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        init_std=0.3,
    )
    return WhisperForConditionalGeneration(config).eval()


def t5_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, 100, (2, 6), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0  # a left-padded row
    labels = torch.randint(2, 100, (2, 4), generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def greedy(model: torch.nn.Module, start: int, steps: int, **inputs) -> torch.Tensor:
    """Greedy decoding by full forward passes (no cache): what generate must reproduce."""
    batch = next(iter(inputs.values())).shape[0]
    decoded = torch.full((batch, 1), start)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(**inputs, decoder_input_ids=decoded).logits[:, -1]
            decoded = torch.cat([decoded, logits.argmax(-1, keepdim=True)], dim=1)
    return decoded


def generated(model: torch.nn.Module, **inputs) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)


def test_t5_prompt_prompts_the_encoder_as_peft_does_and_files_go_both_ways(tmp_path):
    batch = t5_batch()
    ours = apply_adapters(tiny_t5(), PromptTuning(num_virtual_tokens=4))
    theirs = peft.get_peft_model(
        tiny_t5(), peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4)
    )
    # PEFT keeps encoder rows then decoder rows, which its forward never reads
    assert theirs.prompt_encoder.default.embedding.weight.shape == (8, 32)
    with torch.no_grad():
        theirs.prompt_encoder.default.embedding.weight[:4].copy_(
            ours.prompt_tuning.prompt["default"]
        )
    expected = ours(**batch).logits
    torch.testing.assert_close(theirs(**batch).logits, expected, rtol=0, atol=0)
    save_peft(ours, tmp_path / "ours")
    fields = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert fields["num_transformer_submodules"] == 2
    loaded = peft.PeftModel.from_pretrained(tiny_t5(), tmp_path / "ours")
    torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    back = load_peft(tiny_t5(), tmp_path / "theirs")
    torch.testing.assert_close(back(**batch).logits, ours(**batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "config",
    [PromptTuning(num_virtual_tokens=4), PrefixTuning(num_virtual_tokens=4)],
    ids=["prompt", "prefix"],
)
def test_t5_generate_decodes_what_the_forward_computes(config):
    batch = t5_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model = apply_adapters(tiny_t5(), config)
    expected = greedy(model, start=0, steps=5, **inputs)
    assert torch.equal(generated(model, **inputs), expected)
    assert not torch.equal(generated(tiny_t5(), **inputs), expected)  # the adapter acts


@pytest.mark.parametrize(
    "config",
    [PromptTuning(num_virtual_tokens=4), PrefixTuning(num_virtual_tokens=4)],
    ids=["prompt", "prefix"],
)
def test_t5_training_reaches_every_tensor_and_lowers_the_loss(config):
    model = apply_adapters(tiny_t5(), config).train()
    batch = t5_batch()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        if not losses:
            for name in adapter_parameter_names(model):
                assert model.get_parameter(name).grad.abs().sum() > 0, name
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    assert min(losses[1:]) < losses[0]


@pytest.mark.parametrize("reparametrize", [False, True], ids=["prefix", "mlp"])
@pytest.mark.parametrize("layers", [2, 3])
def test_t5_prefix_counts_equal_peft_and_peft_files_load_exactly(tmp_path, layers, reparametrize):
    batch = t5_batch()
    ours = apply_adapters(
        tiny_t5(layers), PrefixTuning(num_virtual_tokens=4, reparametrize=reparametrize)
    )
    config = peft.PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4, prefix_projection=reparametrize
    )
    theirs = peft_or_skip(peft.get_peft_model, tiny_t5(layers), config)
    trained = [p for p in theirs.parameters() if p.requires_grad]
    assert count_parameters(ours).trainable == sum(p.numel() for p in trained)
    with torch.no_grad():
        for param in trained:
            param.normal_(generator=torch.Generator().manual_seed(1))
    expected = peft_or_skip(lambda: theirs.eval()(**batch).logits)
    theirs.save_pretrained(tmp_path)
    loaded = load_peft(tiny_t5(layers), tmp_path)
    torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers", [2, 3])
def test_t5_prefix_files_load_in_peft_with_the_same_logits(tmp_path, layers):
    """PEFT gives decoder layer i the block stored for layer 2i mod L; so does this."""
    batch = t5_batch()
    ours = apply_adapters(tiny_t5(layers), PrefixTuning(num_virtual_tokens=4))
    save_peft(ours, tmp_path)
    loaded = peft_or_skip(peft.PeftModel.from_pretrained, tiny_t5(layers), tmp_path)
    theirs = peft_or_skip(lambda: loaded(**batch).logits)
    torch.testing.assert_close(theirs, ours(**batch).logits, rtol=1e-5, atol=1e-5)
    back = load_peft(tiny_t5(layers), tmp_path)
    torch.testing.assert_close(back(**batch).logits, ours(**batch).logits, rtol=0, atol=1e-6)


@pytest.mark.skipif(
    transformers.__version__ < "5",
    reason="transformers 4.x generate sizes Whisper's caches by the encoder's depth and fails "
    "for this decoder (3 layers, encoder 2), adapters or not",
)
def test_whisper_prefix_trains_and_generates_what_the_forward_computes():
    features = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    model = apply_adapters(tiny_whisper(), PrefixTuning(num_virtual_tokens=3))
    model.train()(input_features=features, labels=labels).loss.backward()
    for name in adapter_parameter_names(model):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    model.eval()
    expected = greedy(model, start=1, steps=4, input_features=features)[:, 1:]
    produced = model.generate(input_features=features, max_new_tokens=4, min_new_tokens=4)
    assert torch.equal(produced[:, -4:], expected)
    base = tiny_whisper().generate(input_features=features, max_new_tokens=4, min_new_tokens=4)
    assert not torch.equal(base[:, -4:], expected)


def test_t5_lora_files_go_both_ways(tmp_path):
    from lightning_peft import LoRA

    batch = t5_batch()
    ours = apply_adapters(tiny_t5(), LoRA(rank=4))
    with torch.no_grad():
        for name in adapter_parameter_names(ours):
            ours.get_parameter(name).add_(0.1)
    save_peft(ours, tmp_path)
    back = load_peft(tiny_t5(), tmp_path)
    torch.testing.assert_close(back(**batch).logits, ours(**batch).logits, rtol=0, atol=0)
    theirs = peft.PeftModel.from_pretrained(tiny_t5(), tmp_path)
    torch.testing.assert_close(theirs(**batch).logits, ours(**batch).logits, rtol=1e-5, atol=1e-5)
