"""``ProgressLog``: progress as plain lines, for runs whose output goes to a log file.

A progress bar redraws one terminal line; written to a file (``nohup``, a scheduler's log,
``| tee``) it shows nothing until the end, and a long run looks dead. ``lightning-peft fit``
adds this callback when its output is not a terminal.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_peft.errors import AdapterConfigError


class ProgressLog(Callback):
    """Every ``every_n_steps`` optimizer steps, one line: the step (of the run's total), the
    training loss, the learning rate, tokens per second and the time left::

        step 20/60  loss 0.4512  lr 3.00e-04  1,840 tokens/s  ETA 1m12s

    Tokens are the batch's ``attention_mask`` ones (else its ``input_ids``), counted from
    this run's first step on (a resumed run measures its own speed).
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        if isinstance(every_n_steps, bool) or not (
            isinstance(every_n_steps, int) and every_n_steps > 0
        ):
            raise AdapterConfigError(f"every_n_steps must be a positive int, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.lines: list[str] = []

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started, self._first_step, self._tokens = time.monotonic(), trainer.global_step, 0
        self._last_step = trainer.global_step

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._tokens += _tokens(batch)
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps:
            return  # an accumulating batch, or not a reporting step
        self._last_step = step
        elapsed = time.monotonic() - self._started
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        parts = [f"step {step}/{total if math.isfinite(total) else '?'}"]
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            # Lightning hands on the loss divided for gradient accumulation: undo that.
            parts.append(f"loss {loss.item() * trainer.accumulate_grad_batches:.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        if elapsed > 0 and self._tokens:
            parts.append(f"{self._tokens / elapsed:,.0f} tokens/s")
        done = step - self._first_step
        if done > 0 and math.isfinite(total):
            parts.append(f"ETA {_duration(elapsed / done * max(0, total - step))}")
        line = "  ".join(parts)
        self.lines.append(line)
        rank_zero_info(line)


def _tokens(batch: Any) -> int:
    if isinstance(batch, dict):
        for key in ("attention_mask", "input_ids"):
            value = batch.get(key)
            if isinstance(value, torch.Tensor):
                return int(value.sum()) if key == "attention_mask" else value.numel()
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    return 0


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
