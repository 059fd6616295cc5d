"""A LightningModule written for adapters: ``PeftMixin``, then ``load_from_checkpoint``.

The module declares its adapters in ``configure_adapters()`` (here IA3 plus LoRA on the
queries: methods combine); Lightning attaches them before it restores anything. The
adapter-only checkpoint it writes is a few KiB, and ``load_from_checkpoint`` rebuilds the
module from it, frozen base and all, computing exactly what the trained module computed.

    python examples/mixin.py               # about 15 seconds on 2 CPU cores
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning as L
import torch
from counting import counting_rows, tiny_llama
from torch.utils.data import DataLoader

from lightning_peft import IA3, AdapterCheckpoint, LoRA, PeftMixin

VOCAB, SEQ = 64, 12


class Counter(PeftMixin, L.LightningModule):
    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)  # the same base every time: the checkpoint holds adapters only
        self.model = tiny_llama(VOCAB)

    def configure_adapters(self):
        return [LoRA(rank=8, alpha=16, target_modules=["q_proj"]), IA3()]

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="lightning_peft_mixin_"))
    L.seed_everything(0, verbose=False)
    module = Counter()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        logger=False,
        enable_model_summary=False,
        callbacks=[AdapterCheckpoint(dirpath=workdir, filename="counter")],
    )
    trainer.fit(
        module,
        DataLoader(list(counting_rows(1024, SEQ, VOCAB, seed=0)), batch_size=32, shuffle=True),
    )

    checkpoint = workdir / "counter.ckpt"
    restored = Counter.load_from_checkpoint(checkpoint)
    held_out = counting_rows(64, SEQ, VOCAB, seed=99)
    module.eval()
    restored.eval()
    with torch.no_grad():
        trained = module.model(input_ids=held_out).logits
        reloaded = restored.model(input_ids=held_out).logits
    accuracy = (reloaded[:, :-1].argmax(-1) == held_out[:, 1:]).float().mean().item()
    print(f"\nnext-token accuracy of the reloaded module: {accuracy:.2f}")
    print(
        f"checkpoint: {checkpoint.stat().st_size / 1024:.0f} KiB; reloaded logits equal the "
        f"trained module's: {torch.equal(trained, reloaded)}"
    )


if __name__ == "__main__":
    main()
