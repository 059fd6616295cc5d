"""The lightning-peft command: fit from the YAML, export, memory."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_peft.lightning.cli import load_adapter_checkpoint, main
from lightning_peft.lightning.tasks import encode, rotten_tomatoes

CONFIG = "examples/configs/smollm2-rt-qlora.yaml"


def test_memory_prints_the_papers_table_for_a_size(capsys):
    main(["memory", "70B", "--gpu", "48"])
    out = capsys.readouterr().out
    assert "| **total** | **840.0** | **96.00** |" in out  # full fine-tuning
    assert "| **total** | **46.2** | **5.28** |" in out  # QLoRA
    assert out.count("does not fit in 48 GB") == 2 and out.count("\nfits in 48 GB") == 1
    with pytest.raises(SystemExit):
        main(["memory", "seventy"])
    assert (
        "size must be a number with an optional K/M/B/T suffix (70B, 135M), got 'seventy'"
        in capsys.readouterr().err
    )


@pytest.mark.slow
def test_fit_from_the_yaml_then_export_peft_and_merged(tmp_path, monkeypatch, capsys):
    root = os.getcwd()
    monkeypatch.chdir(tmp_path)  # the YAML writes under runs/
    config = os.path.join(root, CONFIG)
    main(
        [
            "fit",
            "--config",
            config,
            "--trainer.max_steps",
            "2",
            "--data.init_args.train_size",
            "16",
            "--data.init_args.eval_size",
            "8",
        ]
    )
    ckpt = tmp_path / "runs/cli/checkpoints/sentiment.ckpt"
    assert (
        ckpt.exists()
        and (tmp_path / "runs/cli/checkpoints/sentiment-peft/adapter_config.json").exists()
    )

    main(
        [
            "export",
            "--config",
            config,
            "--ckpt",
            str(ckpt),
            "--peft-dir",
            "peft",
            "--merged-dir",
            "merged",
        ]
    )
    assert "PEFT adapter written to peft" in capsys.readouterr().out
    # The task's tokenizer (and chat template) travels with every export.
    for folder in ("runs/cli/checkpoints/sentiment-peft", "peft", "merged"):
        assert (tmp_path / folder / "tokenizer.json").is_file(), folder
        assert (tmp_path / folder / "tokenizer_config.json").is_file(), folder
    adapted = load_adapter_checkpoint(config, str(ckpt)).model.eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    batch = encode(adapted_tokenizer(), rotten_tomatoes()[:2])
    with torch.no_grad():
        expected = adapted(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        got = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


def adapted_tokenizer():
    from lightning_peft.data import smollm2_tokenizer

    return smollm2_tokenizer()


def test_a_method_registered_outside_the_package_trains_from_a_yaml_config(tmp_path):
    """The CLI checks an adapter's class path against the method protocols, not a list of
    the shipped classes: tests/external_method.py's OutputShift is accepted like LoRA."""
    config = tmp_path / "shift.yaml"
    config.write_text(
        f"""\
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 3
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_peft.PeftCallback
      init_args:
        adapters:
          class_path: tests.external_method.OutputShift
    - class_path: lightning_peft.AdapterCheckpoint
      init_args: {{dirpath: {tmp_path / "checkpoints"}, filename: shift}}
model:
  class_path: tests.lightning_modules.CausalLM
data:
  class_path: tests.lightning_modules.TokenData
"""
    )
    main(["fit", "--config", str(config)])
    saved = torch.load(tmp_path / "checkpoints" / "shift.ckpt", weights_only=True)
    assert saved["lightning_peft"]["adapters"][0]["method"] == "OutputShift"
    shifts = [v for k, v in saved["state_dict"].items() if ".shift." in k]
    assert shifts and any(v.abs().sum() > 0 for v in shifts)  # trained away from zero
