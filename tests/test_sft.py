"""ChatCollator on SmolLM2's real tokenizer and chat template."""

from __future__ import annotations

import pytest
import torch

from lightning_peft import AdapterConfigError
from lightning_peft.data import smollm2_tokenizer
from lightning_peft.sft import IGNORE, ChatCollator
from tests.tiny_models import tiny_llama
from tests.tolerances import reordering_tolerance

pytestmark = pytest.mark.slow  # reads SmolLM2's tokenizer from the asset package

ROWS = [
    {
        "messages": [
            {"role": "user", "content": "Is 'a delight' positive?"},
            {"role": "assistant", "content": "Yes, it is positive."},
            {"role": "user", "content": "And 'a bore'?"},
            {"role": "assistant", "content": "That one is negative."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Sentiment of 'stunning'?"},
            {"role": "assistant", "content": "Positive."},
        ]
    },
]


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def test_labels_are_the_assistant_turns_and_nothing_else(tokenizer):
    batch = ChatCollator(tokenizer, max_length=256)(ROWS)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for row, ids, labels in zip(ROWS, batch["input_ids"], batch["labels"], strict=True):
        trained = tokenizer.decode(ids[labels != IGNORE])
        turns = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert trained == "".join(f"{turn}<|im_end|>\n" for turn in turns)
        assert (labels[labels != IGNORE] == ids[labels != IGNORE]).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def test_train_on_all_labels_every_real_token(tokenizer):
    batch = ChatCollator(tokenizer, max_length=256, train_on="all")(ROWS)
    real = batch["attention_mask"] == 1
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])


def test_a_packed_batch_gives_the_padded_batchs_loss(tokenizer):
    model = tiny_llama(vocab_size=len(tokenizer))
    padded = ChatCollator(tokenizer, max_length=256)(ROWS)
    packed = ChatCollator(tokenizer, max_length=256, pack=True)(ROWS)
    assert packed["input_ids"].shape == (1, 256)  # both rows in one sequence
    assert (packed["position_ids"][0, :5] == torch.arange(5)).all()
    with torch.no_grad():
        expected = model(**padded).loss
        got = model(**packed).loss
        # Without the restarted positions the rows would see each other: another loss.
        leaking = model(input_ids=packed["input_ids"], labels=packed["labels"]).loss
    torch.testing.assert_close(got, expected, **reordering_tolerance(expected, depth=2, width=64))
    assert (leaking - expected).abs() > 1e-4


def test_bad_arguments_are_refused(tokenizer):
    with pytest.raises(AdapterConfigError, match=r"max_length must be an int above 1, got 0"):
        ChatCollator(tokenizer, max_length=0)
    with pytest.raises(AdapterConfigError, match=r"train_on must be 'assistant', 'last' or 'all'"):
        ChatCollator(tokenizer, train_on="user")
