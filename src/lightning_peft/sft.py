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


class ChatCollator:
    """A ``collate_fn`` for chat rows.

    Args:
        tokenizer: a transformers fast tokenizer with a chat template.
        max_length: tokens per row (longer rows are cut), or per packed sequence.
        train_on: ``"assistant"`` (labels only on assistant turns: their text and the token
            that ends the turn) or ``"all"``.
        pack: pack rows into ``max_length`` sequences instead of padding each.

    Raises:
        AdapterConfigError: a bad argument, a tokenizer without a chat template or offsets.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int = 1024,
        train_on: Literal["assistant", "all"] = "assistant",
        pack: bool = False,
    ) -> None:
        problems = []
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 1:
            problems.append(f"max_length must be an int above 1, got {max_length!r}")
        if train_on not in ("assistant", "all"):
            problems.append(f"train_on must be 'assistant' or 'all', got {train_on!r}")
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
        """``(input_ids, labels)`` of one conversation, cut to ``max_length``."""
        render = self.tokenizer.apply_chat_template
        text = render(list(messages), tokenize=False)
        spans = []  # character spans of the assistant turns in ``text``
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(render(list(messages[:i]), tokenize=False, add_generation_prompt=True))
            end = len(render(list(messages[: i + 1]), tokenize=False))
            if not text.startswith(render(list(messages[: i + 1]), tokenize=False)):
                raise AdapterConfigError(
                    "the chat template renders a conversation's beginning differently once "
                    "more turns follow, so assistant turns cannot be located; use "
                    "train_on='all'"
                )
            spans.append((start, end))
        encoded = self.tokenizer(
            text,
            add_special_tokens=False,
            return_offsets_mapping=True,
            truncation=True,
            max_length=self.max_length,
        )
        ids = encoded["input_ids"]
        if self.train_on == "all":
            return ids, list(ids)
        labels = [
            token if any(s <= begin < e for s, e in spans) else IGNORE
            for token, (begin, _) in zip(ids, encoded["offset_mapping"], strict=True)
        ]
        return ids, labels

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return self.batch([self.encode(row["messages"]) for row in rows])

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
            batch["labels"].append(
                [t for _, row_labels in rows for t in row_labels] + [IGNORE] * pad
            )
            # positions restart at each row (and at the padding, a segment of its own)
            positions = [p for row_ids, _ in rows for p in range(len(row_ids))]
            batch["position_ids"].append(positions + list(range(pad)))
        packed: dict[str, Any] = {key: torch.tensor(value) for key, value in batch.items()}
        packed["use_cache"] = False  # with a cache, transformers does not read the packing
        return packed
