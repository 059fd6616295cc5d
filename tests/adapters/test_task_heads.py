"""The head a transformers task class adds (BERT's classifier, Llama's score) trains with
the adapters by default, as Hugging Face PEFT's modules_to_save, and travels in PEFT files."""

from __future__ import annotations

import json
import logging

import lightning as L
import peft
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import (
    LlamaConfig,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from lightning_peft import (
    IA3,
    AdapterConfigError,
    LoRA,
    PeftCallback,
    PrefixTuning,
    PromptTuning,
    Unfreeze,
    apply_adapters,
    count_parameters,
    load_peft,
    save_peft,
)
from lightning_peft.injection import adapter_parameter_names
from lightning_peft.quantization import quantize_model
from tests.tiny_models import VOCAB, tiny_bert


def tiny_roberta() -> RobertaForSequenceClassification:
    torch.manual_seed(0)
    config = RobertaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        num_labels=3,
    )
    return RobertaForSequenceClassification(config).eval()


def tiny_llama_classifier() -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        num_labels=3,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(config).eval()


MODELS = {"bert": tiny_bert, "roberta": tiny_roberta, "llama": tiny_llama_classifier}
METHODS = {
    "lora": LoRA(rank=4, alpha=16),
    "ia3": IA3(),
    "prompt": PromptTuning(num_virtual_tokens=4),
}
HEADS = {"bert": {"classifier"}, "roberta": {"classifier"}, "llama": {"score"}}


def peft_config(method: str, family: str) -> peft.PeftConfig:
    """A new PEFT config each time: PEFT writes the model's sizes into the one it gets."""
    if method == "prompt":
        return peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)
    if family == "llama":  # PEFT's IA3 defaults miss Llama under SEQ_CLS: name ours
        return peft.IA3Config(
            task_type="SEQ_CLS",
            target_modules=["k_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"],
        )
    return peft.IA3Config(task_type="SEQ_CLS")


def trained_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("method", ["ia3", "prompt"])
def test_the_head_trains_by_default_as_in_peft(family, method):
    ours = apply_adapters(MODELS[family](), METHODS[method])
    theirs = peft.get_peft_model(MODELS[family](), peft_config(method, family))
    expected = {
        n.replace("modules_to_save.default.", "")
        .removeprefix("base_model.model.")
        .removeprefix("base_model.")
        for n, p in theirs.named_parameters()
        if p.requires_grad
    }
    ours_names = {
        n.replace("prompt_tuning.prompt.default", "prompt_embeddings.default.weight")
        for n in trained_names(ours)
    }
    expected = {
        n.replace("prompt_encoder.default.embedding.weight", "prompt_embeddings.default.weight")
        for n in expected
    }
    assert ours_names == expected
    assert count_parameters(ours).trainable == sum(
        p.numel() for p in theirs.parameters() if p.requires_grad
    )
    heads = {n.split(".")[0] for n in trained_names(ours) if n.split(".")[0] in HEADS[family]}
    assert heads == HEADS[family]


def test_train_head_false_keeps_the_head_frozen():
    model = apply_adapters(tiny_bert(), LoRA(rank=2), train_head=False)
    assert not any("classifier" in n for n in trained_names(model))
    with pytest.raises(AdapterConfigError, match="train_head must be True or False, got 'no'"):
        apply_adapters(tiny_bert(), LoRA(rank=2), train_head="no")


def test_a_head_a_config_selects_is_left_to_that_config():
    lora_on_head = apply_adapters(tiny_bert(), LoRA(rank=2, target_modules=["classifier"]))
    assert trained_names(lora_on_head) == {
        "classifier.lora_A.default.weight",
        "classifier.lora_B.default.weight",
    }
    unfrozen = apply_adapters(tiny_bert(), [LoRA(rank=2), Unfreeze(["classifier"])])
    assert {n for n in trained_names(unfrozen) if "classifier" in n} == {
        "classifier.weight",
        "classifier.bias",
    }


def test_models_without_a_new_head_train_none():
    from tests.tiny_models import tiny_llama

    model = apply_adapters(tiny_llama(), LoRA(rank=2))
    assert all("lora_" in n for n in trained_names(model))


def classification_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, VOCAB, (12, 10), generator=generator)
    return input_ids, torch.arange(12) % 3


def headline_accuracy(train_head: bool) -> tuple[float, float]:
    """all-MiniLM-L6-v2 (real BERT weights, a new 5-way head) with prompt tuning, 2 epochs
    over 400 BBC headlines: test accuracy on 200 others before and after."""
    from lightning_peft.data import bbc_headlines, load_minilm, stratified_split

    train, test = stratified_split(bbc_headlines(), 400, 200)
    torch.manual_seed(0)
    model, tokenizer = load_minilm(num_labels=5)
    apply_adapters(model, PromptTuning(num_virtual_tokens=8), train_head=train_head)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)

    def encode(rows):
        texts = [text for text, _ in rows]
        batch = tokenizer(texts, padding=True, truncation=True, max_length=24, return_tensors="pt")
        return batch, torch.tensor([label for _, label in rows])

    def accuracy() -> float:
        model.eval()
        batch, labels = encode(test)
        with torch.no_grad():
            return (model(**batch).logits.argmax(-1) == labels).float().mean().item()

    before = accuracy()
    model.train()
    for _ in range(2):
        for start in range(0, len(train), 16):
            batch, labels = encode(train[start : start + 16])
            model(**batch, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return before, accuracy()


@pytest.mark.slow
def test_bert_with_prompt_tuning_learns_through_its_head():
    before, after = headline_accuracy(train_head=True)
    assert after > 0.6 and after > before + 0.3  # 5 topics: chance is 0.2 (seen: 0.31 -> 0.78)
    # The same run with the random head frozen: the prompt alone cannot map to the labels.
    _, frozen = headline_accuracy(train_head=False)
    assert frozen < after - 0.2  # seen: 0.355


@pytest.mark.parametrize(
    "config",
    [LoRA(rank=4, alpha=16, target_modules=["query", "value"]), PromptTuning(num_virtual_tokens=4)],
    ids=["lora", "prompt"],
)
def test_peft_files_carry_the_head_both_ways(tmp_path, config):
    ours = apply_adapters(tiny_bert(), config)
    with torch.no_grad():
        for name in adapter_parameter_names(ours):
            ours.get_parameter(name).add_(0.1 * torch.randn_like(ours.get_parameter(name)))
    input_ids, _ = classification_batch()
    expected = ours(input_ids=input_ids).logits
    save_peft(ours, tmp_path / "ours")
    fields = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert fields["modules_to_save"] == ["classifier"]
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "ours")
    torch.testing.assert_close(theirs(input_ids=input_ids).logits, expected, rtol=0, atol=1e-6)
    theirs.save_pretrained(tmp_path / "theirs")  # lists ["classifier", "score"]
    back = load_peft(tiny_bert(), tmp_path / "theirs")
    torch.testing.assert_close(back(input_ids=input_ids).logits, expected, rtol=0, atol=1e-6)
    assert count_parameters(back).trainable == count_parameters(ours).trainable


def test_a_4bit_base_keeps_the_head_float_and_trains_it():
    model = quantize_model(tiny_roberta(), "nf4", adapters=LoRA(rank=2))
    assert type(model.classifier.dense) is torch.nn.Linear
    assert type(model.classifier.out_proj) is torch.nn.Linear
    assert {"classifier.dense.weight", "classifier.out_proj.weight"} <= trained_names(model)


def test_prefix_tuning_on_a_classifier_trains_its_head_too():
    model = apply_adapters(tiny_llama_classifier(), PrefixTuning(num_virtual_tokens=3))
    assert "score.weight" in trained_names(model)


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_bert()

    def training_step(self, batch, batch_idx):
        input_ids, labels = batch
        return self.model(input_ids=input_ids, labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def train_one_step(callback: PeftCallback) -> Classifier:
    module = Classifier()
    input_ids, labels = classification_batch()
    data = DataLoader(list(zip(input_ids, labels, strict=True)), batch_size=4)
    trainer = L.Trainer(
        max_steps=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    return module


def test_the_callback_announces_the_head_and_can_keep_it_frozen(caplog):
    with caplog.at_level(logging.INFO):
        module = train_one_step(PeftCallback(LoRA(rank=2)))
    assert "Training the task head model.classifier (195 parameters)" in caplog.text
    assert "train_head=False keeps it frozen" in caplog.text
    assert module.model.classifier.weight.requires_grad
    caplog.clear()
    with caplog.at_level(logging.INFO):
        module = train_one_step(PeftCallback(LoRA(rank=2), train_head=False))
    assert "task head" not in caplog.text
    assert not module.model.classifier.weight.requires_grad


def test_a_task_class_whose_prefix_names_no_child_gets_peft_head_names():
    """T5ForQuestionAnswering's base_model_prefix ("transformer") is not one of its
    children: its head is qa_outputs, not the whole encoder-decoder."""
    from transformers import T5Config, T5ForQuestionAnswering

    from lightning_peft.adapters.heads import task_head_names

    config = T5Config(d_model=16, d_ff=32, d_kv=4, num_heads=4, num_layers=1, vocab_size=VOCAB)
    assert task_head_names(T5ForQuestionAnswering(config)) == ["qa_outputs"]
