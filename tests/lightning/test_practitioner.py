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
    assert files == ["adapter_config.json", "adapter_model.safetensors", "lightning_peft.json"]
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


def test_an_adapter_says_what_base_it_needs_and_loading_stores_the_base_so(tmp_path):
    import pytest

    module = CausalLM()
    fit(module, tmp_path / "run", 2, [], trainer_class=lightning_peft.Trainer, precision="nf4-lora")
    module.model.save_pretrained(tmp_path / "saved")
    record = json.loads((tmp_path / "saved" / "lightning_peft.json").read_text())
    assert record == {
        "base_quantization": {
            "blocksize": 64,
            "double_quant": True,
            "mode": "nf4",
            "skip_modules": ["lm_head"],  # the linear layers that stayed float
        }
    }
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    module.model.eval()
    with torch.no_grad():
        trained = module.model(input_ids=ids).logits
        # A float base: quantized as recorded, by default; the answers are the trained run's.
        auto = load_peft(tiny_llama(0), tmp_path / "saved")
        torch.testing.assert_close(auto(input_ids=ids).logits, trained)
        # Told otherwise: a warning that the answers will differ.
        with pytest.warns(UserWarning, match=r"trained over a nf4 base, and quantize=None"):
            plain = load_peft(tiny_llama(0), tmp_path / "saved", quantize=None)
        assert not torch.allclose(plain(input_ids=ids).logits, trained)


def test_serve_stores_the_base_as_the_adapters_record_unless_told(tmp_path, capsys):
    import pytest

    from lightning_peft.serving.cli import base_precision

    module = CausalLM()
    fit(module, tmp_path / "run", 1, [], trainer_class=lightning_peft.Trainer, precision="nf4-lora")
    module.model.save_pretrained(tmp_path / "qlora")
    plain = CausalLM()
    fit(plain, tmp_path / "run2", 1, [lightning_peft.PeftCallback()])
    plain.model.save_pretrained(tmp_path / "float")
    assert base_precision(None, {"a": str(tmp_path / "qlora")}) == "nf4"
    assert base_precision(None, {"b": str(tmp_path / "float")}) is None
    assert base_precision("float", {"a": str(tmp_path / "qlora")}) is None
    assert "adapter a trained over a nf4 base; served over a float one" in capsys.readouterr().err
    import shutil

    shutil.copytree(tmp_path / "float", tmp_path / "int8")
    (tmp_path / "int8" / "lightning_peft.json").write_text(
        '{"base_quantization": {"mode": "int8"}}'
    )
    with pytest.raises(SystemExit):  # one base cannot be both
        base_precision(None, {"a": str(tmp_path / "qlora"), "c": str(tmp_path / "int8")})
    assert "trained over different bases (int8, nf4)" in capsys.readouterr().err


def test_layers_kept_float_in_training_stay_float_when_loaded(tmp_path):
    import pytest

    from lightning_peft import PeftCallback, PeftPrecision

    module = CausalLM()
    plugin = PeftPrecision("nf4-lora", skip_modules=["down_proj"])
    fit(module, tmp_path / "run", 2, [PeftCallback()], plugins=[plugin])
    module.model.save_pretrained(tmp_path / "saved")
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    module.model.eval()
    loaded = load_peft(tiny_llama(0), tmp_path / "saved")
    down = loaded.model.layers[0].mlp.down_proj.base_layer
    assert type(down).__name__ == "Linear"  # float, as in training
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, module.model(input_ids=ids).logits)
    # Over a base quantized otherwise (int8): said, not silent.
    with pytest.warns(UserWarning, match=r"trained over a nf4 base, and this model's int8 base"):
        load_peft(quantize_model(tiny_llama(0), "int8"), tmp_path / "saved")


def test_save_pretrained_refuses_what_it_would_otherwise_ignore(tmp_path):
    import pytest

    module = CausalLM()
    fit(module, tmp_path / "run", 1, [lightning_peft.PeftCallback()])
    with pytest.raises(TypeError, match=r"does not take push_to_hub=True.*merge_and_export"):
        module.model.save_pretrained(tmp_path / "out", push_to_hub=True)
    assert not (tmp_path / "out").exists()


def test_progress_shows_the_loss_before_lightning_divides_it_for_accumulation(tmp_path):
    from lightning_peft import PeftCallback
    from lightning_peft.lightning import ProgressLog
    from tests.lightning_modules import QV_LORA

    progress = ProgressLog(every_n_steps=1)
    run = fit(CausalLM(), tmp_path, 2, [PeftCallback(QV_LORA), progress], accumulate_grad_batches=2)
    # Lightning hands on loss / 2; the line shows the batch's loss, as the module computed it.
    printed = float(progress.lines[-1].split("loss ")[1].split()[0])
    assert printed == round(2 * run.losses[-1], 4) and printed > 4  # ~ln(256) = 5.5
