"""Quick start: an unchanged LightningModule, fine-tuned with one callback, then resumed.

A tiny Llama (built from a config: random weights, nothing downloaded) is quantized to
NF4 and wrapped in an ordinary LightningModule. ``PeftCallback`` attaches LoRA adapters and
freezes the rest; ``AdapterCheckpoint`` keeps checkpoints that hold only the adapters. The
adapters learn a rule the base cannot know (the next token is the current one plus one).
Then a second run resumes from the half-way checkpoint and ends on exactly the same loss.

    python examples/quickstart.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from counting import counting_rows, next_token_accuracy, tiny_llama
from torch.utils.data import DataLoader

from lightning_peft import AdapterCheckpoint, LoRA, PeftCallback, count_parameters
from lightning_peft.quantization import quantize_model

VOCAB, SEQ, STEPS = 128, 16, 120


class CountingLM(L.LightningModule):
    """A plain LightningModule around a causal LM; nothing in it is about adapters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = quantize_model(tiny_llama(VOCAB), "nf4")  # the QLoRA base

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)  # frozen tensors are dropped


def train(
    workdir: Path, max_steps: int, ckpt_path: Path | None = None
) -> tuple[CountingLM, L.Trainer]:
    L.seed_everything(0, verbose=False)
    module = CountingLM()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_model_summary=ckpt_path is None,
        default_root_dir=workdir,
        callbacks=[
            PeftCallback(LoRA(rank=16, alpha=32, target_modules="all-linear")),
            AdapterCheckpoint(dirpath=workdir, every_n_train_steps=STEPS // 2, save_top_k=-1),
        ],
    )
    data = DataLoader(
        list(counting_rows(STEPS // 2 * 32, SEQ, VOCAB, seed=0)), batch_size=32, shuffle=True
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, trainer


def main() -> None:
    held_out = counting_rows(64, SEQ, VOCAB, seed=1234)
    workdir = Path(tempfile.mkdtemp(prefix="lightning_peft_quickstart_"))
    print(
        f"next-token accuracy of the NF4 base: {next_token_accuracy(CountingLM().model, held_out):.2f}"
    )

    started = time.perf_counter()
    module, trainer = train(workdir, STEPS)
    print(
        f"trained {STEPS} steps in {time.perf_counter() - started:.1f} s; parameters: {count_parameters(module)}"
    )
    print(f"next-token accuracy after:  {next_token_accuracy(module.model, held_out):.2f}")
    final_loss = trainer.callback_metrics["loss"].item()

    halfway = workdir / f"epoch=0-step={STEPS // 2}.ckpt"
    print(
        f"adapter checkpoint: {halfway.stat().st_size / 1024:.0f} KiB (adapters, AdamW state, loops, RNG)"
    )
    _, resumed = train(workdir, STEPS, ckpt_path=halfway)
    resumed_loss = resumed.callback_metrics["loss"].item()
    print(
        f"final loss {final_loss:.6f}; resumed from step {STEPS // 2}: {resumed_loss:.6f} "
        f"({'identical' if resumed_loss == final_loss else 'DIFFERENT'})"
    )
    print(f"checkpoints in {workdir}")


if __name__ == "__main__":
    main()
