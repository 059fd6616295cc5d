"""How adapter-only checkpoints are written and checked inside a Lightning Trainer.

Shared by ``PeftCallback``, ``AdapterCheckpoint`` and ``PeftMixin``. The order of events in
``Trainer.fit`` (Lightning 2.6) decides where each step lives:

    setup hooks -> restore model (LightningModule.on_load_checkpoint, load_state_dict)
    -> Callback.on_load_checkpoint -> strategy.setup (configure_optimizers)
    -> on_fit_start -> restore optimizers, schedulers, loops -> training steps

So adapters are attached in ``setup`` (before the model is restored), optimizers are pruned
and their parameter order checked in ``on_fit_start`` (before their state is restored), and
RNG state is put back there too. Strategies that restore after setup (FSDP)
move the restore after ``on_fit_start``; :class:`ResumeChecks` handles both orders.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_peft.checkpoint import (
    METADATA_KEY,
    build_metadata,
    check_adapter_state_dict,
    check_base_fingerprint,
    check_optimizer_names,
    is_adapter_only,
    read_metadata,
    rng_state,
    set_rng_state,
)
from lightning_peft.errors import AdapterStateError
from lightning_peft.injection import adapter_parameter_names


def optimizer_param_names(trainer: pl.Trainer | None, module: nn.Module) -> list[list[str]]:
    """For each optimizer of ``trainer``, the names of its parameters in state order."""
    if trainer is None:
        return []
    names = {id(param): name for name, param in module.named_parameters()}
    return [
        [
            names.get(id(param), "<not a parameter of the module>")
            for group in optimizer.param_groups
            for param in group["params"]
        ]
        for optimizer in trainer.optimizers
    ]


def write_adapter_only_(checkpoint: dict[str, Any], module: pl.LightningModule) -> None:
    """Reduce a Lightning checkpoint dict to the adapter tensors and add the metadata.

    Idempotent: several hooks may call it on the same checkpoint.
    """
    if METADATA_KEY in checkpoint:
        return
    keys = adapter_parameter_names(module)
    if not keys:
        raise AdapterStateError(
            f"{type(module).__name__} has no adapters, so there is no adapter checkpoint to "
            "write: attach them with PeftCallback, PeftMixin or apply_adapters first"
        )
    state = checkpoint.get("state_dict", {})
    checkpoint["state_dict"] = {
        k: state[k] if k in state else module.get_parameter(k).detach() for k in keys
    }
    metadata = build_metadata(module, keys, optimizer_param_names(module._trainer, module))
    metadata["rng"] = rng_state()
    checkpoint[METADATA_KEY] = metadata


def check_if_adapter_only(module: nn.Module, state_dict: dict[str, Any]) -> bool:
    """Whether ``state_dict`` is adapter-only; if it is, check it fits before anything is copied."""
    if not is_adapter_only(module, state_dict):
        return False
    check_adapter_state_dict(module, state_dict)
    return True


def _check_before_load(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    if prefix == "":  # the LightningModule itself, called once before any child loads
        check_if_adapter_only(module, state_dict)


def accept_adapter_only_loading(module: pl.LightningModule) -> None:
    """Let Lightning load adapter-only state dicts into ``module``, checked strictly.

    Lightning calls ``load_state_dict(strict=module.strict_loading)``; frozen tensors are
    absent from adapter checkpoints, so loading must be non-strict, and this pre-hook puts
    the strictness back for the adapter tensors (keys and shapes) before anything is copied.
    """
    module.strict_loading = False
    if not getattr(module, "_lightning_peft_load_check", False):
        module.register_load_state_dict_pre_hook(_check_before_load)
        module._lightning_peft_load_check = True


def keep_trainable_in_optimizers_(trainer: pl.Trainer, module: nn.Module) -> None:
    """Drop frozen parameters from the optimizers ``configure_optimizers`` built.

    ``torch.optim.AdamW(self.parameters())`` is the common way to write it; the frozen base
    would only take slots (and, for some optimizers, memory). Before the first step no state
    exists for them, so removing them is safe; hyperparameters and schedulers stay bound.
    """
    if not trainer.optimizers:
        return
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            group["params"] = [param for param in group["params"] if param.requires_grad]
    in_optimizers = {
        id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]
    }
    if not in_optimizers:
        raise AdapterStateError(
            "configure_optimizers returned optimizers with no trainable parameter. Adapters are "
            "attached before configure_optimizers runs: build the optimizer from "
            "self.parameters() (frozen ones are dropped) or from the parameters that require grad."
        )
    left_out = [
        n for n, p in module.named_parameters() if p.requires_grad and id(p) not in in_optimizers
    ]
    if left_out:
        rank_zero_warn(
            f"{len(left_out)} trainable tensors are in no optimizer and will not train, e.g. "
            f"{', '.join(left_out[:3])}. Build the optimizer from self.parameters()."
        )


class ResumeChecks:
    """What resuming needs across hooks: the checkpoint's metadata arrives while the model is
    restored, the optimizers exist only from ``on_fit_start``; whichever comes second finishes.

    Finishing checks the optimizers' parameter order against the checkpoint's and puts the
    RNG state back. ``on_fit_start`` is late enough for the optimizers and early enough for
    the RNG: in a resumed run Lightning draws the DataLoader's seed after it and before
    ``on_train_start``, as the uninterrupted run did right after the checkpoint.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._metadata: dict[str, Any] | None = None
        self._source = "the checkpoint"
        self._optimizers_ready = False

    def on_load(
        self, trainer: pl.Trainer | None, module: nn.Module, checkpoint: dict[str, Any]
    ) -> None:
        source = (
            f"checkpoint {str(trainer.ckpt_path)!r}"
            if trainer is not None and trainer.ckpt_path
            else "the checkpoint"
        )
        metadata = read_metadata(checkpoint, source)
        check_base_fingerprint(metadata, module, source)
        self._metadata, self._source = metadata, source
        if self._optimizers_ready:  # strategies that restore after setup (FSDP) load late
            self._finish(trainer, module)

    def on_fit_start(self, trainer: pl.Trainer, module: nn.Module) -> None:
        keep_trainable_in_optimizers_(trainer, module)
        self._optimizers_ready = True
        if self._metadata is not None:
            self._finish(trainer, module)

    def _finish(self, trainer: pl.Trainer | None, module: nn.Module) -> None:
        assert self._metadata is not None
        saved = self._metadata["optimizer_param_names"]
        if trainer is not None and saved:  # written outside fit: no optimizer state to match
            check_optimizer_names(saved, optimizer_param_names(trainer, module), self._source)
        if "rng" in self._metadata:
            set_rng_state(self._metadata["rng"])
        self._metadata = None
