"""Assistant spans are checked against the conversation for every template in the zoo
(tests/chat_templates.py): a property test over generated conversations, and the cases that
once trained on the wrong tokens without a word."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_peft import AdapterConfigError
from lightning_peft.data import smollm2_tokenizer
from lightning_peft.sft import IGNORE, ChatCollator
from tests.chat_templates import TEMPLATES, tokenizer_for
from tests.tiny_models import tiny_llama
from tests.tolerances import reordering_tolerance

pytestmark = pytest.mark.slow  # reads SmolLM2's tokenizer from the asset package


@pytest.fixture(scope="module")
def base_tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def tokenizers(base_tokenizer):
    return {name: tokenizer_for(name, base_tokenizer) for name in TEMPLATES}


def labelled_runs(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded text of each run of consecutive labelled tokens."""
    runs: list[list[int]] = []
    previous = IGNORE
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            if previous == IGNORE:
                runs.append([])
            runs[-1].append(token)
        previous = label
    return [tokenizer.decode(run) for run in runs]


def assert_is_turn(run: str, expected: str) -> None:
    """``run`` is ``expected``, or it with the whitespace the template put before the answer
    (carried by the token of its first word)."""
    assert run == expected or (
        run.endswith(expected) and run[: len(run) - len(expected)].isspace()
    ), (run, expected)


# Contents: any printable text, empty included, unicode and newlines; not Qwen 3's reasoning
# marker, which its template removes from earlier turns by design.
contents = st.text(
    st.characters(
        codec="utf-8", exclude_categories=("Cs", "Cc", "Co", "Cn"), include_characters="\n"
    ),
    max_size=24,
).filter(lambda text: "</think>" not in text and "<think>" not in text)
turns = st.lists(st.tuples(contents, contents), min_size=1, max_size=3)


def conversation(system: str | None, pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    messages = [] if system is None else [{"role": "system", "content": system}]
    for user, assistant in pairs:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


@pytest.mark.parametrize("train_on", ["assistant", "last"])
@pytest.mark.parametrize("name", TEMPLATES)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(system=st.none() | contents, pairs=turns)
def test_labels_decode_to_the_assistant_contents_and_their_end_markers(
    tokenizers, name, train_on, system, pairs
):
    tokenizer = tokenizers[name]
    _, expected = TEMPLATES[name]
    messages = conversation(system, pairs)
    ids, labels = ChatCollator(tokenizer, max_length=4096, train_on=train_on).encode(messages)
    assert all(label in (IGNORE, token) for token, label in zip(ids, labels, strict=True))
    answers = [content for _, content in pairs]
    eos = tokenizer.eos_token
    wanted = [expected(content, i == len(answers) - 1, eos) for i, content in enumerate(answers)]
    if train_on == "last":
        wanted = wanted[-1:]
    runs = labelled_runs(tokenizer, ids, labels)
    assert len(runs) == len(wanted)
    for run, turn in zip(runs, wanted, strict=True):
        assert_is_turn(run, turn)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(system=st.none() | contents, pairs=turns)
def test_labels_equal_the_assistant_mask_transformers_reads_from_generation_markers(
    tokenizers, system, pairs
):
    tokenizer = tokenizers["chatml-generation-markers"]
    messages = conversation(system, pairs)
    ids, labels = ChatCollator(tokenizer, max_length=4096).encode(messages)
    marked = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert marked["input_ids"] == ids
    assert [int(label != IGNORE) for label in labels] == list(marked["assistant_masks"])


QUESTION = [{"role": "user", "content": "Is it?"}]
ANSWER = {"role": "assistant", "content": "The answer is yes."}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # Its generation prompt opens an empty <think> block: not the start of the turn.
        ("qwen3-no-thinking", "The answer is yes.<|im_end|>\n"),
        # No generation branch, a header ending in a space: the header is not trained on,
        # the answer's first word (" The") is.
        ("no-generation-branch", " The answer is yes.\n"),
        ("mistral", " The answer is yes.{eos}"),
    ],
)
def test_templates_that_used_to_train_on_the_wrong_tokens(tokenizers, name, expected):
    tokenizer = tokenizers[name]
    ids, labels = ChatCollator(tokenizer).encode([*QUESTION, ANSWER])
    assert labelled_runs(tokenizer, ids, labels) == [expected.format(eos=tokenizer.eos_token)]


def test_a_template_that_rewrites_the_content_is_refused_naming_the_turn(base_tokenizer):
    tokenizer = tokenizer_for("chatml", base_tokenizer)
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "message.content", "message.content | upper"
    )
    with pytest.raises(
        AdapterConfigError, match=r"assistant turn 1: the chat template does not render"
    ):
        ChatCollator(tokenizer).encode([*QUESTION, ANSWER])
    assert ChatCollator(tokenizer, train_on="all").encode([*QUESTION, ANSWER])  # the fix it names


ROWS = [
    {
        "messages": [
            *QUESTION,
            ANSWER,
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Tell me."},
            {"role": "assistant", "content": "No."},
        ]
    },
]


@pytest.mark.parametrize("train_on", ["assistant", "last", "all"])
def test_packing_never_crosses_rows_and_gives_the_padded_loss(base_tokenizer, train_on):
    model = tiny_llama(vocab_size=len(base_tokenizer))
    padded = ChatCollator(base_tokenizer, max_length=256, train_on=train_on)(ROWS)
    packed = ChatCollator(base_tokenizer, max_length=256, train_on=train_on, pack=True)(ROWS)
    # The same number of predicted labels: a row's first token is never predicted.
    assert (padded["labels"][:, 1:] != IGNORE).sum() == (packed["labels"][:, 1:] != IGNORE).sum()
    with torch.no_grad():
        expected, got = model(**padded).loss, model(**packed).loss
    torch.testing.assert_close(got, expected, **reordering_tolerance(expected, depth=2, width=64))


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([], r"empty batch"),
        ([{"messages": [{"role": "user", "content": None}]}], r"batch row 0: message 0 must be"),
        ([{"messages": [{"content": "hi"}]}], r"batch row 0: message 0 must be"),
        ([{"text": "hi"}], r"batch row 0: expected \{'messages'"),
    ],
)
def test_the_collator_refuses_rows_it_cannot_train_on(base_tokenizer, rows, match):
    with pytest.raises(AdapterConfigError, match=match):
        ChatCollator(base_tokenizer, pack=True)(rows)
