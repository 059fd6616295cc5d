"""The calls a practitioner makes around training: save_pretrained, offline PEFT folders."""

from __future__ import annotations

import json

import torch

import lightning_peft
from lightning_peft import load_peft
from lightning_peft.quantization import quantize_model
from tests.lightning_modules import CausalLM, fit
from tests.tiny_models import tiny_llama


def test_save_pretrained_after_qlora_writes_the_adapters_as_peft_does(tmp_path):
    module = CausalLM()
    fit(module, tmp_path / "run", 2, [], trainer_class=lightning_peft.Trainer, precision="nf4-lora")
    module.model.save_pretrained(tmp_path / "saved")
    files = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    # It loads back onto the same base, quantized the same way, and computes the same.
    loaded = load_peft(quantize_model(tiny_llama(0), "nf4"), tmp_path / "saved")
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, module.model(input_ids=ids).logits)


def test_a_merged_export_of_it_is_an_ordinary_model_again(tmp_path):
    module = CausalLM()
    fit(module, tmp_path / "run", 1, [], trainer_class=lightning_peft.Trainer, precision="nf4-lora")
    lightning_peft.merge_and_export(module.model, tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


def test_progress_lines_name_step_loss_lr_speed_and_time_left(tmp_path):
    import re

    from lightning_peft import PeftCallback
    from lightning_peft.lightning import ProgressLog
    from tests.lightning_modules import QV_LORA

    progress = ProgressLog(every_n_steps=2)
    run = fit(CausalLM(), tmp_path, 6, [PeftCallback(QV_LORA), progress])
    assert len(progress.lines) == 3
    pattern = r"step (\d)/6  loss (\d+\.\d{4})  lr \d\.\d\de-\d\d  [\d,]+ tokens/s  ETA \dm\d\ds"
    for line, step in zip(progress.lines, (2, 4, 6), strict=True):
        match = re.fullmatch(pattern, line)
        assert match and int(match[1]) == step, line
        assert float(match[2]) == round(run.losses[step - 1], 4)
    assert progress.lines[-1].endswith("ETA 0m00s")
