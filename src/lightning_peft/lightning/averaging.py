"""``AdapterWeightAveraging``: an exponential or uniform average of the adapter tensors.

Lightning's ``WeightAveraging`` / ``EMAWeightAveraging`` and ``StochasticWeightAveraging``
deep-copy the whole module and average every tensor in it: a frozen base only costs memory
and drifts by rounding, a 4-bit base is corrupted (its packed uint8 codes are averaged as
numbers), and every checkpoint holds the whole averaged model, which adapter-only resume
cannot load. Only the adapters change during training, so only they are averaged here; the
average travels in the callback's own checkpoint state, beside the current adapters that
training resumes from.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_peft.errors import AdapterConfigError, AdapterStateError
from lightning_peft.injection import adapter_parameters


class AdapterWeightAveraging(Callback):
    """Average the adapter tensors over training steps, as Lightning's ``EMAWeightAveraging``
    (``decay``) or ``StochasticWeightAveraging`` (``decay=None``: the mean of every update)
    average the whole model.

    As in Lightning's callbacks, validation runs on the averaged adapters (the current ones
    come back after it), the model holds the average when training ends, and checkpoints
    hold the average as their ``state_dict`` (so the best checkpoint holds what scored best)
    and the adapters training goes on from in this callback's state, from which a resumed
    run continues exactly: adapter tensors only, never a frozen or 4-bit one.

    Args:
        decay: the EMA's decay, ``average = decay * average + (1 - decay) * current``, in
            [0, 1); ``None``: the running mean of all updates (SWA's average).
        update_every_n_steps: update after every n-th optimizer step.
        update_starting_at_step: the first optimizer step (counted from 0) that updates;
            the average starts as a copy of the adapters there.

    Example::

        trainer = L.Trainer(callbacks=[PeftCallback(LoRA(rank=8)), AdapterWeightAveraging(0.999)])
    """

    def __init__(
        self,
        decay: float | None = 0.999,
        *,
        update_every_n_steps: int = 1,
        update_starting_at_step: int = 0,
    ) -> None:
        problems = []
        if decay is not None and not (
            isinstance(decay, (int, float)) and not isinstance(decay, bool) and 0 <= decay < 1
        ):
            problems.append(f"decay must be None or a number in [0, 1), got {decay!r}")
        for name, value in [
            ("update_every_n_steps", update_every_n_steps),
            ("update_starting_at_step", update_starting_at_step),
        ]:
            minimum = 1 if name == "update_every_n_steps" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                problems.append(f"{name} must be an int >= {minimum}, got {value!r}")
        if problems:
            raise AdapterConfigError(
                "invalid AdapterWeightAveraging:\n  - " + "\n  - ".join(problems)
            )
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.average: dict[str, torch.Tensor] = {}
        self.updates = 0
        self._latest_step = 0
        self._swapped = False
        # Read from a checkpoint on resume, applied at fit start (see on_fit_start).
        self._training: dict[str, torch.Tensor] = {}
        self._saved: dict[str, torch.Tensor] = {}

    def should_update(self, step_idx: int) -> bool:
        """Whether optimizer step ``step_idx`` (from 0) updates the average."""
        start = self.update_starting_at_step
        return step_idx >= start and (step_idx - start) % self.update_every_n_steps == 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """Fold ``module``'s current adapter tensors into the average."""
        current = _adapters(module)
        if not self.average:
            self.average = {name: tensor.detach().clone() for name, tensor in current.items()}
        else:
            weight = 1 / (self.updates + 1) if self.decay is None else 1 - self.decay
            for name, tensor in current.items():
                self.average[name].lerp_(tensor.detach(), weight)
        self.updates += 1

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resuming: the model was loaded with the file's average; the average goes back in
        here and the adapters training goes on from go back into the model."""
        training, self._training = self._training, {}
        saved, self._saved = self._saved, {}
        if not training:
            return
        current = _adapters(pl_module)
        if sorted(training) != sorted(current):
            raise AdapterStateError(
                "AdapterWeightAveraging's state in the checkpoint holds other adapters than "
                f"this model has ({len(training)} tensors vs {len(current)}, e.g. "
                f"{next(iter(training))!r}): resume with the same adapters"
            )
        with torch.no_grad():
            self.average = {name: current[name].detach().clone() for name in current}
            for name, tensor in saved.items():
                if name in self.average:
                    self.average[name].copy_(tensor)
            for name, tensor in training.items():
                current[name].copy_(tensor)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # global_step counts optimizer steps: a batch that only accumulates does not update.
        step = trainer.global_step
        if step > self._latest_step and self.should_update(step - 1):
            self.update(pl_module)
            self._latest_step = step

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.average and trainer.state.fn == "fit":
            self._swap(pl_module)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._swapped:
            self._swap(pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        current = _adapters(pl_module)
        with torch.no_grad():
            for name, tensor in self.average.items():
                current[name].copy_(tensor)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "latest_update_step": self._latest_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = state_dict["updates"]
        self._latest_step = state_dict["latest_update_step"]
        self._training = dict(state_dict.get("training_adapters") or {})

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """The file's ``state_dict`` holds the average (what validation scored, what
        ``ckpt_path="best"``, export and serving should get); the adapters training goes on
        from travel in this callback's state. During validation they are swapped already."""
        if not self.average:
            return
        current = _adapters(pl_module)
        training = self.average if self._swapped else current
        averaged = current if self._swapped else self.average
        state = checkpoint.setdefault("state_dict", {})
        for name, tensor in averaged.items():
            state[name] = tensor.detach().clone()
        mine = checkpoint.setdefault("callbacks", {}).setdefault(self.state_key, {})
        mine["training_adapters"] = {k: v.detach().clone() for k, v in training.items()}

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._saved = dict(checkpoint.get("state_dict", {}))

    @torch.no_grad()
    def _swap(self, module: torch.nn.Module) -> None:
        current = _adapters(module)
        for name, tensor in self.average.items():
            held = current[name].detach().clone()
            current[name].copy_(tensor)
            tensor.copy_(held)
        self._swapped = not self._swapped


def _adapters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors = adapter_parameters(module)
    if not tensors:
        raise AdapterStateError(
            f"AdapterWeightAveraging found no adapters in {type(module).__name__}: use it with "
            "PeftCallback, PeftMixin or PeftPrecision, which attach them"
        )
    return dict(tensors)
