"""``ddp_spawn`` under ``precision="nf4-lora"`` (2 CPU processes, in the distributed folder:
multi-process tests run once, not again for each bitsandbytes CPU path)."""

from __future__ import annotations

import pytest
import torch

import lightning_peft
from lightning_peft.injection import adapter_parameter_names
from tests.lightning_modules import CausalLM, MixinLM, fit, token_data

FLAG = {"trainer_class": lightning_peft.Trainer, "precision": "nf4-lora"}


def test_the_flag_and_the_callback_under_ddp_spawn_are_refused_with_the_fix(tmp_path):
    with pytest.raises(Exception, match=r"ddp_spawn.*strategy='ddp'"):
        fit(CausalLM(), tmp_path, 1, [], strategy="ddp_spawn", devices=2, **FLAG)


def test_a_mixin_module_comes_back_from_ddp_spawn_quantized_and_adapted(tmp_path):
    module = MixinLM()
    fit(module, tmp_path, 2, [], strategy="ddp_spawn", devices=2, **FLAG)
    assert type(module.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert adapter_parameter_names(module)
    output = module.model(input_ids=token_data(8).dataset[0][None]).logits
    assert torch.isfinite(output).all()
