"""Instruction-tuning batches from chat conversations, for any chat-templated tokenizer.

``ChatCollator`` turns ``{"messages": [{"role": ..., "content": ...}, ...]}`` rows into
``input_ids``, ``labels`` and either ``attention_mask`` (padded rows) or ``position_ids``
(packed rows). Only the assistant's tokens are trained on by default: every other token's
label is -100, as TRL's completion-only collator does. Packing puts several rows into one
``max_length`` sequence; restarting the position ids at each row makes transformers keep
attention within each row (it reads packed sequences from the position ids when no
attention mask is given), so a packed batch computes what the padded one does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from lightning_peft.errors import AdapterConfigError

IGNORE = -100
# Stands in for an assistant message's content to find where the template puts it.
_PLACEHOLDER = "lightningpeftcontent7f3a9"


def _shared_length(a: str, b: str) -> int:
    """How many characters ``a`` and ``b`` share at their start."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def check_messages(messages: Any) -> list[dict[str, str]]:
    """``messages`` if it is a non-empty list of ``{"role": str, "content": str}``.

    Raises:
        AdapterConfigError: naming the first message that is not.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise AdapterConfigError(f"messages must be a non-empty list, got {str(messages)[:80]!r}")
    for index, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise AdapterConfigError(
                f"message {index} must be {{'role': str, 'content': str}}, got "
                f"{str(message)[:80]!r}"
            )
    return list(messages)


def check_labelled_span(
    text: str, offsets: Sequence[tuple[int, int]], labels: Sequence[int], span: tuple[int, int]
) -> None:
    """Check that the tokens labelled for ``span`` cover exactly its text: from the token
    holding its first character (which may start with the whitespace before it) to its end,
    or to the end of the kept tokens where ``max_length`` cut the row.

    Raises:
        AdapterConfigError: the labelled text is not the span's.
    """
    start, end = span
    covered = [
        (b, e)
        for (b, e), label in zip(offsets, labels, strict=True)
        if label != IGNORE and b < end and e > start
    ]
    if not covered:
        if offsets and offsets[-1][1] <= start:  # cut off by max_length: nothing to check
            return
        raise AdapterConfigError(
            f"no token labelled for the assistant text {text[start:end][:40]!r}"
        )
    first, last = covered[0][0], covered[-1][1]
    truncated = offsets[-1][1] < end
    if text[first:start].strip() or (last != end and not truncated) or last > end:
        raise AdapterConfigError(
            f"the labelled text {text[first:last][:60]!r} is not the assistant's "
            f"{text[start:end][:60]!r}: the tokenizer joins the turn with what surrounds it"
        )


class ChatCollator:
    """A ``collate_fn`` for chat rows.

    Args:
        tokenizer: a transformers fast tokenizer with a chat template.
        max_length: tokens per row (longer rows are cut), or per packed sequence.
        train_on: ``"assistant"`` (labels only on assistant turns: their text and what
            ends the turn, checked against each message), ``"last"`` (the last assistant
            turn only) or ``"all"``.
        pack: pack rows into ``max_length`` sequences instead of padding each.

    Raises:
        AdapterConfigError: a bad argument, a tokenizer without a chat template or offsets.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int = 1024,
        train_on: Literal["assistant", "last", "all"] = "assistant",
        pack: bool = False,
    ) -> None:
        problems = []
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 1:
            problems.append(f"max_length must be an int above 1, got {max_length!r}")
        if train_on not in ("assistant", "last", "all"):
            problems.append(f"train_on must be 'assistant', 'last' or 'all', got {train_on!r}")
        if not getattr(tokenizer, "chat_template", None):
            problems.append(f"{type(tokenizer).__name__} has no chat template")
        if not getattr(tokenizer, "is_fast", False):
            problems.append("the tokenizer must be a fast one (it maps tokens to characters)")
        if problems:
            raise AdapterConfigError("invalid ChatCollator:\n  - " + "\n  - ".join(problems))
        self.tokenizer, self.max_length = tokenizer, max_length
        self.train_on, self.pack = train_on, pack
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(self, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one conversation, cut to ``max_length``.

        Raises:
            AdapterConfigError: the template's assistant turns cannot be located and checked
                (see :meth:`assistant_spans`).
        """
        messages = check_messages(messages)
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False)
        encoded = self.tokenizer(
            text,
            add_special_tokens=False,
            return_offsets_mapping=True,
            truncation=True,
            max_length=self.max_length,
        )
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        if self.train_on == "all":
            return ids, list(ids)
        spans = self.assistant_spans(messages, text)
        if self.train_on == "last":
            spans = spans[-1:]
        # A token is trained on when it overlaps an assistant span: the one that carries the
        # answer's first word may begin with the space the template put before it.
        labels = [
            token if any(begin < e and end > s for s, e in spans) else IGNORE
            for token, (begin, end) in zip(ids, offsets, strict=True)
        ]
        for s, e in spans:
            check_labelled_span(text, offsets, labels, (s, e))
        return ids, labels

    def assistant_spans(
        self, messages: Sequence[dict[str, str]], text: str
    ) -> list[tuple[int, int]]:
        """The character spans of ``text`` (the rendered conversation) that hold each
        assistant message: its content as rendered, then what the template ends the turn
        with (``<|im_end|>\n``, ``<|eot_id|>``, ...), nothing of the role header.

        The conversation is rendered again with a placeholder for the turn's content: what
        surrounds the placeholder must surround the content in ``text`` too, which locates it
        without assuming anything of the template (a generation prompt that is not the turn's
        header, none at all, history rendered another way). The end of the turn is what
        follows the content both when the conversation goes on and when it ends there. A
        template that renders the content other than as given (beyond trimming whitespace)
        cannot be checked, and is refused.

        Raises:
            AdapterConfigError: naming the turn and the fix.
        """
        render = self.tokenizer.apply_chat_template
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            marked = {**message, "content": _PLACEHOLDER}
            full = render([*messages[:i], marked, *messages[i + 1 :]], tokenize=False)
            before, found, after = full.partition(_PLACEHOLDER)
            content = text[len(before) : len(text) - len(after)]
            if not (
                found
                and _PLACEHOLDER not in after
                and text.startswith(before)
                and text.endswith(after)
                and content in (message["content"], message["content"].strip())
            ):
                raise AdapterConfigError(
                    f"assistant turn {i}: the chat template does not render the assistant's "
                    f"content {message['content'][:40]!r} as given, so the tokens to train on "
                    "cannot be located and checked. Use a template that renders message "
                    "contents as they are (most do), or train_on='all'"
                )
            last = render([*messages[:i], marked], tokenize=False).partition(_PLACEHOLDER)[2]
            end_of_turn = last[: _shared_length(last, after)]
            if end_of_turn != last:
                # The template ends a conversation otherwise than a turn (Phi-3 adds its eos
                # token): the turn's end is the part both share, up to its last line break.
                end_of_turn = end_of_turn[: max(map(end_of_turn.rfind, ("\n", " "))) + 1]
            start = len(before)
            spans.append((start, start + len(content) + len(end_of_turn)))
        return spans

    def encode_prompt(self, messages: Sequence[dict[str, str]]) -> tuple[list[int], str | None]:
        """``(input_ids, reference)`` to generate an answer for a conversation: everything
        before its last assistant message, then the template's generation prompt; the
        reference is that message's content (None when the conversation ends otherwise).
        Cut to the last ``max_length`` tokens (the end is where the answer starts)."""
        messages = check_messages(messages)
        reference = None
        if messages[-1]["role"] == "assistant":
            reference, messages = messages[-1]["content"], messages[:-1]
        text = self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[-self.max_length :], reference

    def prompt_batch(self, prompts: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        """Prompts padded on the left (generation continues each at the same position)."""
        width = max(len(ids) for ids in prompts)
        return {
            "input_ids": torch.tensor([[self.pad_id] * (width - len(i)) + i for i in prompts]),
            "attention_mask": torch.tensor(
                [[0] * (width - len(i)) + [1] * len(i) for i in prompts]
            ),
        }

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not rows:
            raise AdapterConfigError(
                "ChatCollator got an empty batch: it would be all padding, with a NaN loss"
            )
        encoded = []
        for number, row in enumerate(rows):
            if not isinstance(row, dict) or "messages" not in row:
                raise AdapterConfigError(
                    f"batch row {number}: expected {{'messages': [...]}}, got {str(row)[:80]!r}"
                )
            try:
                encoded.append(self.encode(row["messages"]))
            except AdapterConfigError as error:
                raise AdapterConfigError(f"batch row {number}: {error}") from error
        return self.batch(encoded)

    def batch(self, encoded: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
        r"""The batch of rows already :meth:`encode`\ d (a collate_fn over encodings)."""
        return self._packed(encoded) if self.pack else self._padded(encoded)

    def _padded(self, encoded: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in encoded)
        batch: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for ids, labels in encoded:
            pad = width - len(ids)
            batch["input_ids"].append(ids + [self.pad_id] * pad)
            batch["attention_mask"].append([1] * len(ids) + [0] * pad)
            batch["labels"].append(labels + [IGNORE] * pad)
        return {key: torch.tensor(value) for key, value in batch.items()}

    def _packed(self, encoded: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
        sequences: list[list[tuple[list[int], list[int]]]] = [[]]
        for row in encoded:  # rows are never split: a row that does not fit starts a sequence
            used = sum(len(ids) for ids, _ in sequences[-1])
            if sequences[-1] and used + len(row[0]) > self.max_length:
                sequences.append([])
            sequences[-1].append(row)
        batch: dict[str, list[Any]] = {"input_ids": [], "labels": [], "position_ids": []}
        for rows in sequences:
            ids = [t for row_ids, _ in rows for t in row_ids]
            pad = self.max_length - len(ids)
            batch["input_ids"].append(ids + [self.pad_id] * pad)
            # A row's first token is never predicted from within the row (a padded batch
            # drops it in the shift); packed, the previous row's last token would predict it.
            batch["labels"].append(
                [t for _, row_labels in rows for t in [IGNORE, *row_labels[1:]]] + [IGNORE] * pad
            )
            # positions restart at each row (and at the padding, a segment of its own)
            positions = [p for row_ids, _ in rows for p in range(len(row_ids))]
            batch["position_ids"].append(positions + list(range(pad)))
        packed: dict[str, Any] = {key: torch.tensor(value) for key, value in batch.items()}
        packed["use_cache"] = False  # with a cache, transformers does not read the packing
        return packed
