"""Ready-made tasks on real data, for the demo, the CLI and the benchmarks.

``ReviewSentiment`` is SmolLM2-135M-Instruct judging Rotten Tomatoes reviews: each review
becomes ``"Review: <text>\\nSentiment:"`` and the model answers `` positive`` or
`` negative``. Accuracy is rank classification between the two answers; training minimises
cross-entropy between them. ``ReviewData`` holds held-out reviews in the data's own
proportions (58% fresh) and training reviews balanced between the labels. Both are ordinary
Lightning classes: adapters come from ``PeftCallback`` or a ``precision="nf4-lora"`` flag.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_peft.data import (
    ListDataset,
    load_smollm2,
    rotten_tomatoes,
    smollm2_tokenizer,
    stratified_split,
)

ANSWERS = (" negative", " positive")  # label 0, label 1
Rows = Sequence[tuple[str, int]]


def review_prompt(text: str, max_chars: int = 300) -> str:
    # Long snippets are rare; cutting them keeps CPU batches short.
    return f"Review: {text[:max_chars]}\nSentiment:"


def review_split(train: int, test: int, seed: int = 0) -> tuple[list, list]:
    """Held-out reviews in the data's proportions, and ``train`` reviews balanced between
    the labels (so a few steps cannot win by favouring one answer); never overlapping."""
    rows = rotten_tomatoes()
    _, test_rows = stratified_split(rows, 0, test, seed=seed)
    held_out = set(test_rows)
    pool = [row for row in rows if row not in held_out]
    random.Random(seed).shuffle(pool)
    per_label = [[row for row in pool if row[1] == label][: train // 2] for label in (0, 1)]
    return [row for pair in zip(*per_label, strict=True) for row in pair], test_rows


def answer_ids(tokenizer: Any) -> torch.Tensor:
    """The token of each answer, ``(2,)``: both answers are single tokens for SmolLM2."""
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in ANSWERS]
    if not all(len(i) == 1 for i in ids):
        raise ValueError(f"the answers {ANSWERS} must be single tokens, got {ids}")
    return torch.tensor([i[0] for i in ids])


def encode(tokenizer: Any, rows: Rows) -> dict[str, torch.Tensor]:
    """Prompts left-padded (so the last position predicts the answer) and their labels."""
    batch = tokenizer([review_prompt(t) for t, _ in rows], return_tensors="pt", padding=True)
    return {**batch, "label": torch.tensor([y for _, y in rows])}


def review_loader(tokenizer: Any, rows: Rows, batch_size: int, shuffle: bool) -> DataLoader:
    return DataLoader(
        ListDataset(list(rows)),
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=lambda batch: encode(tokenizer, batch),
    )


def answer_scores(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], answers: torch.Tensor
) -> torch.Tensor:
    """Log-probabilities of the two answers at the end of each prompt, ``(B, 2)``."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.log_softmax(logits[:, -1].float(), dim=-1)[:, answers.to(logits.device)]


@torch.no_grad()
def score(
    model: torch.nn.Module, tokenizer: Any, rows: Rows, batch_size: int = 16
) -> tuple[float, float]:
    """Rank-classification accuracy of ``model`` on ``rows`` and its mean cross-entropy
    between the two answers (the training loss of :class:`ReviewSentiment`, held out)."""
    was_training = model.training
    model.eval()
    answers, hits, loss = answer_ids(tokenizer), 0, 0.0
    device = next(model.parameters()).device
    for batch in review_loader(tokenizer, rows, batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        scores = answer_scores(model, batch, answers)
        hits += (scores.argmax(-1) == batch["label"]).sum().item()
        loss += torch.nn.functional.cross_entropy(scores, batch["label"], reduction="sum").item()
    model.train(was_training)
    return hits / len(rows), loss / len(rows)


def loss_on(model: torch.nn.Module, tokenizer: Any, rows: Rows) -> float:
    """Mean cross-entropy of ``model`` on ``rows`` (see :func:`score`), with the global RNG
    left as it was: a DataLoader's iterator draws its seed from it, and a pass before training
    would shift every random draw of the run."""
    with torch.random.fork_rng():
        return score(model, tokenizer, rows)[1]


def accuracy(model: torch.nn.Module, tokenizer: Any, rows: Rows, batch_size: int = 16) -> float:
    """Rank-classification accuracy of ``model`` on ``rows``."""
    return score(model, tokenizer, rows, batch_size)[0]


class ReviewSentiment(pl.LightningModule):
    """SmolLM2-135M-Instruct answering positive / negative; nothing in it is about adapters.

    Args:
        lr: AdamW learning rate over the trainable tensors.
        model: a causal LM to use instead of loading SmolLM2 (tests pass a tiny one).
        tokenizer: its tokenizer (with ``model``).
    """

    def __init__(self, lr: float = 3e-4, model: Any = None, tokenizer: Any = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "tokenizer"])
        if model is None:
            model, tokenizer = load_smollm2()
        self.model = model.train()
        self.tokenizer = tokenizer
        self.answers = answer_ids(tokenizer)
        self.lr = lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(
            answer_scores(self.model, batch, self.answers), batch["label"]
        )
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        scores = answer_scores(self.model, batch, self.answers)
        hits = (scores.argmax(-1) == batch["label"]).float()
        self.log("val_acc", hits.mean(), prog_bar=True, batch_size=len(hits))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=self.lr)


class ReviewData(pl.LightningDataModule):
    """Rotten Tomatoes reviews for :class:`ReviewSentiment` (tokenized by SmolLM2's tokenizer)."""

    def __init__(
        self, train_size: int = 640, eval_size: int = 200, batch_size: int = 8, seed: int = 0
    ) -> None:
        super().__init__()
        self.train_size, self.eval_size = train_size, eval_size
        self.batch_size, self.seed = batch_size, seed
        self.tokenizer: Any = None

    def setup(self, stage: str | None = None) -> None:
        self.tokenizer = smollm2_tokenizer()
        self.train_rows, self.eval_rows = review_split(self.train_size, self.eval_size, self.seed)

    def train_dataloader(self) -> DataLoader:
        return review_loader(self.tokenizer, self.train_rows, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return review_loader(self.tokenizer, self.eval_rows, 16, shuffle=False)
