"""Tokenizers and chat templates travel with the adapter: PEFT folders and merged exports
work on their own."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_peft import (
    AdapterCheckpoint,
    LoRA,
    PeftCallback,
    apply_adapters,
    load_peft,
    save_peft,
)
from lightning_peft.checkpoint.export import merge_and_export
from lightning_peft.data import smollm2_tokenizer
from tests.lightning_modules import QV_LORA, CausalLM, fit
from tests.tiny_models import tiny_llama

pytestmark = pytest.mark.slow  # reads SmolLM2's tokenizer from the asset package

CHAT = [{"role": "user", "content": "Is this review positive? 'A delight.'"}]


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def assert_same_tokenizer(folder, tokenizer) -> None:
    loaded = AutoTokenizer.from_pretrained(folder)
    text = "Review: a delight from start to finish.\nSentiment:"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.chat_template and loaded.chat_template == tokenizer.chat_template
    assert loaded.apply_chat_template(CHAT, tokenize=False) == tokenizer.apply_chat_template(
        CHAT, tokenize=False
    )


def adapted() -> torch.nn.Module:
    return apply_adapters(tiny_llama(), LoRA(rank=2, target_modules=["q_proj"]))


def test_save_peft_writes_the_tokenizer_and_chat_template_beside_the_adapter(tmp_path, tokenizer):
    save_peft(adapted(), tmp_path / "adapter", tokenizer=tokenizer)
    assert_same_tokenizer(tmp_path / "adapter", tokenizer)
    load_peft(tiny_llama(), tmp_path / "adapter")  # still an ordinary PEFT folder

    # A later save without a tokenizer leaves the one there alone.
    names = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    save_peft(adapted(), tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == names


def test_merge_and_export_writes_the_tokenizer_beside_the_model(tmp_path, tokenizer):
    merge_and_export(adapted(), tmp_path / "merged", tokenizer=tokenizer)
    assert_same_tokenizer(tmp_path / "merged", tokenizer)
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")


class WithTokenizer(CausalLM):
    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer


def test_adapter_checkpoint_exports_the_modules_tokenizer_with_each_peft_folder(
    tmp_path, tokenizer
):
    saver = AdapterCheckpoint(
        dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=2, export_peft=True
    )
    fit(WithTokenizer(tokenizer), tmp_path, 2, [PeftCallback(QV_LORA), saver])
    assert_same_tokenizer(tmp_path / "ckpt" / "step=2-peft", tokenizer)

    without = AdapterCheckpoint(
        dirpath=tmp_path / "plain",
        filename="{step}",
        every_n_train_steps=2,
        export_peft=True,
        tokenizer=None,
    )
    fit(WithTokenizer(tokenizer), tmp_path, 2, [PeftCallback(QV_LORA), without])
    names = {p.name for p in (tmp_path / "plain" / "step=2-peft").iterdir()}
    assert names == {"adapter_config.json", "adapter_model.safetensors"}
