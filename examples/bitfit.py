"""BitFit on a real model: only the bias terms of all-MiniLM-L6-v2 learn BBC News topics.

Ben Zaken et al. (2021) fine-tune BERT by training its biases alone (0.1% of the weights).
The classifier head is new, so it trains too (``Unfreeze``); two methods combine in one list.
The task: which of five topics a BBC News headline belongs to.

    python examples/bitfit.py              # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_peft import BitFit, PeftCallback, Unfreeze, count_parameters
from lightning_peft.data import BBC_TOPICS, bbc_headlines, load_minilm, stratified_split


class HeadlineClassifier(L.LightningModule):
    """A plain LightningModule around a sequence classifier."""

    def __init__(self, model: torch.nn.Module, lr: float) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=self.lr)


def loader(tokenizer, rows, batch_size: int, shuffle: bool) -> DataLoader:
    def encode(batch):
        encoded = tokenizer(
            [t for t, _ in batch], padding=True, truncation=True, max_length=32, return_tensors="pt"
        )
        return {**encoded, "labels": torch.tensor([y for _, y in batch])}

    return DataLoader(list(rows), batch_size=batch_size, shuffle=shuffle, collate_fn=encode)


@torch.no_grad()
def accuracy(model: torch.nn.Module, tokenizer, rows) -> float:
    model.eval()
    hits = sum(
        (model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1) == b["labels"])
        .sum()
        .item()
        for b in loader(tokenizer, rows, 64, shuffle=False)
    )
    return hits / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--fast", action="store_true", help="a smoke run (tests): 1 epoch of 160")
    args = parser.parse_args()
    train_size = 160 if args.fast else 800
    epochs = 1 if args.fast else args.epochs

    started = time.perf_counter()
    L.seed_everything(0, verbose=False)
    model, tokenizer = load_minilm(num_labels=len(BBC_TOPICS))
    train_rows, test_rows = stratified_split(bbc_headlines(), train_size, 400)
    before = accuracy(model, tokenizer, test_rows)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=[PeftCallback([BitFit(), Unfreeze(["classifier"])])],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(HeadlineClassifier(model, args.lr), loader(tokenizer, train_rows, 16, shuffle=True))
    after = accuracy(model, tokenizer, test_rows)
    counts = count_parameters(model)
    print("\nBitFit + new head on all-MiniLM-L6-v2, BBC News headlines (5 topics, 400 held out)")
    print(f"  accuracy before: {before:.3f}   (an untrained head: chance is 0.2)")
    print(f"  accuracy after:  {after:.3f}   ({epochs} epochs of {train_size} headlines)")
    print(
        f"  trainable:       {counts.trainable:,} of {counts.total:,} parameters ({100 * counts.trainable_fraction:.2f}%)"
    )
    print(f"  total time:      {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
