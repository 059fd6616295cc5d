"""Answers generated for chat prompts: the metrics ``validate`` reports on them, and the
JSON Lines file ``predict`` writes beside the prompts.

    lightning-peft predict --config chat.yaml --ckpt_path runs/chat/checkpoints/chat.ckpt \\
        --data.init_args.predict_file held_out.jsonl     # -> held_out.predictions.jsonl
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_peft.checkpoint import atomic_path

Metric = Callable[[str, str], bool]


def answer_metrics(names: Sequence[str]) -> dict[str, Metric]:
    """The metrics ``names`` asks for, by the name they are logged under (``val_`` + name):
    ``"exact_match"`` (the answer, stripped, equals the reference, stripped) and
    ``"regex:<pattern>"`` (the answer matches the pattern, ``re.search``; logged as
    ``val_regex``, or ``val_regex_<n>`` for the n-th of several).

    Raises:
        ValueError: an unknown name or a pattern that does not compile.
    """
    metrics: dict[str, Metric] = {}
    patterns = [n for n in names if isinstance(n, str) and n.startswith("regex:")]
    for name in names:
        if name == "exact_match":
            metrics["exact_match"] = lambda answer, reference: answer.strip() == reference.strip()
        elif isinstance(name, str) and name.startswith("regex:"):
            try:
                pattern = re.compile(name.removeprefix("regex:"))
            except re.error as error:
                raise ValueError(f"val_metrics: {name!r} does not compile: {error}") from error
            key = "regex" if len(patterns) == 1 else f"regex_{patterns.index(name)}"
            metrics[key] = _matches(pattern)
        else:
            raise ValueError(f"val_metrics takes 'exact_match' and 'regex:<pattern>', got {name!r}")
    return metrics


def _matches(pattern: re.Pattern[str]) -> Metric:
    return lambda answer, reference: pattern.search(answer) is not None


@torch.no_grad()
def generate_answers(
    model: Any, tokenizer: Any, batch: dict[str, torch.Tensor], **generate_kwargs: Any
) -> list[str]:
    """The text ``model.generate`` continues each (left-padded) prompt of ``batch`` with."""
    device = model.get_input_embeddings().weight.device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    output = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad, **generate_kwargs)
    return list(tokenizer.batch_decode(output[:, ids.shape[1] :], skip_special_tokens=True))


def predictions_path(predict_file: str) -> Path:
    """``held_out.jsonl`` -> ``held_out.predictions.jsonl``, beside it."""
    path = Path(predict_file)
    return path.with_name(f"{path.stem}.predictions.jsonl")


class ChatPredictionWriter(BasePredictionWriter):
    """Write the data module's predict rows, each with its ``"prediction"``, as JSON Lines
    (by default beside the prompts: ``<file>.predictions.jsonl``), in their order, whole or
    not at all. ``lightning-peft predict`` adds it for ``ChatData``."""

    def __init__(self, output: str | None = None) -> None:
        super().__init__("epoch")
        self.output = output
        self.written: Path | None = None

    @override
    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        datamodule: Any = getattr(trainer, "datamodule", None)
        rows = getattr(datamodule, "predict_rows", None)
        source = getattr(datamodule, "predict_file", None)
        if rows is None or not (self.output or source):
            return
        answers = {item["index"]: item["prediction"] for batch in predictions for item in batch}
        path = Path(self.output) if self.output else predictions_path(str(source))
        lines = [
            json.dumps({**row, "prediction": answers[index]}, ensure_ascii=False)
            for index, row in enumerate(rows)
            if index in answers  # limit_predict_batches may stop before the end
        ]
        with atomic_path(path) as temporary:
            Path(temporary).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        self.written = path
        print(f"{len(lines)} predictions written to {path}")
        if len(lines) < len(rows):
            rank_zero_warn(
                f"{len(rows) - len(lines)} of the {len(rows)} rows were not predicted "
                "(limit_predict_batches?): they are not in the file"
            )
