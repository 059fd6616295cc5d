"""Small LightningModules and helpers for the Lightning tests: a tiny Llama trained on
random tokens with AdamW and a per-step LR schedule, as users write them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_peft import LoRA, PeftMixin
from lightning_peft.quantization import quantize_model
from tests.tiny_models import VOCAB, tiny_llama

QV_LORA = LoRA(rank=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"])


def quantize_decoder(model: torch.nn.Module, mode: str = "nf4") -> torch.nn.Module:
    return quantize_model(model, mode)  # every linear layer but the head


class CausalLM(L.LightningModule):
    """An ordinary LightningModule: knows nothing about adapters."""

    def __init__(
        self,
        base_seed: int = 0,
        nf4: bool = False,
        reverse_optimizer: bool = False,
        bias: bool = False,
        lr: float = 1e-2,
    ) -> None:
        super().__init__()
        self.lr = lr
        self.model = tiny_llama(base_seed, bias=bias).train()
        if nf4:
            quantize_decoder(self.model)
        self.reverse_optimizer = reverse_optimizer

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        # Runs only when fit gets val_dataloaders.
        self.log("val_loss", self.model(input_ids=batch, labels=batch).loss)

    def configure_optimizers(self) -> Any:
        params = list(self.parameters())
        if self.reverse_optimizer:
            params.reverse()
        optimizer = torch.optim.AdamW(params, lr=self.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class MixinLM(PeftMixin, CausalLM):
    def __init__(self, *args: Any, adapters: LoRA = QV_LORA, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.adapters = adapters

    def configure_adapters(self) -> LoRA:
        return self.adapters


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


def token_data(n: int = 12, length: int = 16, stateful: bool = False) -> DataLoader:
    """Random token rows, shuffled, 4 a batch; ``stateful``: torchdata's StatefulDataLoader,
    whose position in the epoch Lightning saves (exact mid-epoch resume)."""
    data = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(7))
    if stateful:
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(list(data), batch_size=4, shuffle=True)
    return DataLoader(list(data), batch_size=4, shuffle=True)


def counting_data(n: int = 64, length: int = 16) -> DataLoader:
    """A learnable task: rows that count up by one (17, 18, 19, ...)."""
    start = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(7))
    return DataLoader(list((start + torch.arange(length)) % VOCAB), batch_size=16, shuffle=True)


def fit(
    module: L.LightningModule,
    root: Path,
    max_steps: int,
    callbacks: list,
    ckpt_path: str | None = None,
    weights_only: bool | None = None,
    trainer_class: type[L.Trainer] = L.Trainer,
    data: DataLoader | None = None,
    val_data: DataLoader | None = None,
    **trainer_kwargs: Any,
) -> LossRecorder:
    """Seed, train ``max_steps`` on the CPU and return the per-step losses."""
    L.seed_everything(123, verbose=False)
    recorder = LossRecorder()
    options = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    options.update(trainer_kwargs)
    trainer = trainer_class(callbacks=[*callbacks, recorder], **options)
    trainer.fit(
        module,
        data or token_data(),
        val_dataloaders=val_data,
        ckpt_path=ckpt_path,
        weights_only=weights_only,
    )
    recorder.trainer = trainer
    return recorder


class SlowCausalLM(CausalLM):
    """A CausalLM that takes ``delay`` seconds a step and writes the steps it has taken to
    ``progress``: a run for a test to interrupt from outside."""

    def __init__(self, progress: str, delay: float = 0.3) -> None:
        super().__init__()
        self.progress, self.delay = progress, delay

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        import time

        time.sleep(self.delay)
        return super().training_step(batch, batch_idx)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After the optimizer step: the steps written are steps taken.
        Path(self.progress).write_text(str(self.global_step))


class TokenData(L.LightningDataModule):
    """Random token rows, 8 batches an epoch."""

    def train_dataloader(self) -> DataLoader:
        return token_data(32)
