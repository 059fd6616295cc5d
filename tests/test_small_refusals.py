"""Small inputs users get wrong, each refused (or understood) with the value and the fix."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from lightning_peft import (
    AdapterConfigError,
    LoRA,
    PeftPrecision,
    adapter_state_dict,
    apply_adapters,
    load_adapter_state_dict,
    save_peft,
)
from lightning_peft.lightning.cli import main as cli_main
from lightning_peft.quantization import quantize_model
from lightning_peft.quantization.estimate import estimate_memory
from tests.tiny_models import tiny_llama


def test_one_skip_module_given_as_a_string_is_one_name():
    assert PeftPrecision(skip_modules="down_proj").skip_modules == ("down_proj",)
    model = quantize_model(tiny_llama(), "nf4", skip_modules="down_proj")
    kept = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert sorted(kept) == [
        "lm_head",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)


def test_estimate_memory_takes_the_sizes_the_cli_takes():
    assert estimate_memory("70B", "full").total_bytes == estimate_memory(70e9, "full").total_bytes
    with pytest.raises(ValueError, match=r"at least one parameter, got 0"):
        estimate_memory(0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["0"], "a model has at least one parameter, got '0'"),
        (["0.0000001"], "at least one parameter"),
        (["1.2.3B"], "size must be a number with an optional K/M/B/T suffix"),
        (["7B", "--adapter-fraction", "2"], r"adapter_fraction must be in \[0, 1\), got 2.0"),
        (["7B", "--gpu", "-5"], "--gpu must be a positive number of GB, got -5.0"),
        (["7B", "--gpu", "nan"], "--gpu must be a positive number of GB, got nan"),
    ],
)
def test_cli_memory_usage_errors_exit_2_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["memory", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lightning-peft memory: error: ")
    assert __import__("re").search(message, err[-1])


def test_cli_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    out = capsys.readouterr().out
    assert all(word in out for word in ("fit, validate, test, predict", "export", "memory"))


def test_save_peft_records_the_models_own_name_by_default(tmp_path):
    model = tiny_llama()
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    apply_adapters(model, LoRA(rank=2, target_modules=["q_proj"]))
    save_peft(model, tmp_path)
    config = (tmp_path / "adapter_config.json").read_text()
    assert '"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"' in config


def test_a_model_carrying_hugging_face_peft_adapters_is_refused_naming_load_peft():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    structure = repr(peft_model)
    with pytest.raises(AdapterConfigError, match=r"Hugging Face PEFT adapters.*load_peft"):
        apply_adapters(peft_model, LoRA(rank=2))
    assert repr(peft_model) == structure


def test_a_compiled_modules_adapter_state_loads_into_the_uncompiled_one_and_back():
    source = apply_adapters(tiny_llama(), LoRA(rank=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, param in source.named_parameters():
            if "lora_B" in name:
                param.fill_(0.5)
    compiled = torch.compile(source)  # keys gain _orig_mod.
    state = adapter_state_dict(compiled)
    assert all(k.startswith("_orig_mod.") for k in state)
    plain = apply_adapters(tiny_llama(), LoRA(rank=2, target_modules=["q_proj"]))
    load_adapter_state_dict(plain, state)
    assert all(
        torch.equal(v, state["_orig_mod." + k]) for k, v in adapter_state_dict(plain).items()
    )
    target = torch.compile(apply_adapters(tiny_llama(), LoRA(rank=2, target_modules=["q_proj"])))
    load_adapter_state_dict(target, adapter_state_dict(plain))
    assert all(torch.equal(v, state[k]) for k, v in adapter_state_dict(target).items())


def test_an_empty_target_list_is_named_as_the_problem():
    from lightning_peft.errors import TargetModulesError

    with pytest.raises(TargetModulesError, match=r"target_modules is empty \(got \(\)\)"):
        apply_adapters(tiny_llama(), LoRA(target_modules=[]))


def test_export_peft_with_a_method_peft_lacks_is_refused_before_training(tmp_path):
    from lightning_peft import AdapterCheckpoint, BottleneckAdapter, PeftCallback
    from tests.lightning_modules import CausalLM, fit

    saver = AdapterCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, export_peft=True)
    recorder_steps = []
    with pytest.raises(AdapterConfigError, match=r"export_peft=True.*BottleneckAdapter has no"):
        run = fit(CausalLM(), tmp_path, 3, [PeftCallback(BottleneckAdapter()), saver])
        recorder_steps.append(run.trainer.global_step)
    assert not recorder_steps and not (tmp_path / "ckpt").exists()


def test_adapters_on_a_meta_device_model_are_refused_with_the_way_out():
    with torch.device("meta"):
        model = tiny_llama()
    with pytest.raises(AdapterConfigError, match=r"q_proj.*meta device.*to_empty.*then attach"):
        apply_adapters(model, LoRA(rank=2, target_modules=["q_proj"]))
    assert not any("lora" in n for n, _ in model.named_modules())


def test_training_a_merged_model_says_it_is_merged(tmp_path):
    from lightning_peft import AdapterStateError, merge_adapters
    from tests.lightning_modules import MixinLM, fit

    module = MixinLM()
    module.configure_model()  # adapters attached, as fit would
    merge_adapters(module)
    with pytest.raises(AdapterStateError, match=r"merged into their base layers.*unmerge_adapters"):
        fit(module, tmp_path, 1, [])


def test_prompt_tuning_refuses_models_that_read_features_not_tokens():
    from transformers import (
        ViTConfig,
        ViTForImageClassification,
        WhisperConfig,
        WhisperForConditionalGeneration,
    )

    from lightning_peft import PromptTuning
    from tests.snapshots import refused_without_a_trace

    vit = ViTForImageClassification(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=8,
            patch_size=4,
        )
    )
    whisper = WhisperForConditionalGeneration(
        WhisperConfig(
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            vocab_size=64,
            num_mel_bins=8,
            max_source_positions=16,
            max_target_positions=16,
            pad_token_id=1,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        )
    )
    with refused_without_a_trace(
        whisper, AdapterConfigError, "reads input_features .* use LoRA or IA3"
    ):
        apply_adapters(whisper, PromptTuning(num_virtual_tokens=2))
    with refused_without_a_trace(vit, AdapterConfigError, "reads pixel_values .* use LoRA or IA3"):
        apply_adapters(vit, PromptTuning(num_virtual_tokens=2))


def test_a_method_whose_wrap_returns_no_adapter_is_refused_and_the_model_left_as_it_was():
    class Forgetful(LoRA):  # returns a module without adapter_params() and a disabled flag
        def wrap(self, layer, adapter_name="default", module_name=""):
            return torch.nn.Sequential(layer)

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterConfigError) as refused:
        apply_adapters(model, Forgetful(rank=2, target_modules=["q_proj"]))
    assert str(refused.value) == (
        "Forgetful.wrap returned a Sequential, which is not an adapter module: it needs "
        "adapter_params() and a disabled flag (lightning_peft.protocol.AdapterModule)"
    )
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
