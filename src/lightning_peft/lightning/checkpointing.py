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

Validation passes (the sanity check, epoch-end and ``val_check_interval`` validation) draw
from the global RNG: at least the seed of their DataLoader's iterator. A resumed run skips
the validation the checkpoint was written before and adds a sanity check of its own, so
those draws would shift every later dropout mask and shuffle. :func:`hold_rng_for_validation`
and :func:`release_rng_after_validation` make each validation pass invisible to training:
the RNG state from before it is put back after it, and a checkpoint written during it
records that state.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_peft._compat import attached_trainer
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
from lightning_peft.checkpoint.io import held_tokenizer
from lightning_peft.errors import AdapterStateError
from lightning_peft.injection import adapter_modules, adapter_parameter_names
from lightning_peft.lightning.module_state import state_of
from lightning_peft.protocol import is_merged


def optimizer_param_names(trainer: pl.Trainer | None, module: nn.Module) -> list[list[str]]:
    """For each optimizer of ``trainer``, the names of its trainable parameters in state order.

    Frozen ones are left out: they leave the optimizers at ``on_fit_start``
    (:func:`keep_trainable_in_optimizers_`), after a tuner (``LearningRateFinder``,
    ``BatchSizeFinder``: Lightning runs their ``on_fit_start`` first) saved its own
    checkpoint, which it restores once the frozen ones are gone.
    """
    if trainer is None:
        return []
    names = {id(param): name for name, param in module.named_parameters()}
    return [
        [
            names.get(id(param), "<not a parameter of the module>")
            for group in optimizer.param_groups
            for param in group["params"]
            if param.requires_grad
        ]
        for optimizer in trainer.optimizers
    ]


def hold_rng_for_validation(module: nn.Module) -> None:
    """Remember the RNG state now, the last moment before a validation pass may begin.

    Called where training hands over to validation: ``on_fit_start`` (the sanity check
    follows) and ``on_train_batch_end``. Idempotent: the callback and the mixin may both call.
    """
    state_of(module).rng_before_validation = rng_state()


def forget_held_rng(module: nn.Module) -> None:
    """Training goes on (``on_train_batch_start``): a held state would be stale from now."""
    state_of(module).rng_before_validation = None


def release_rng_after_validation(module: nn.Module) -> None:
    """Put back the RNG state held before this validation pass (``on_validation_end``)."""
    state = state_of(module)
    held, state.rng_before_validation = state.rng_before_validation, None
    if held is not None:
        set_rng_state(held)


def write_adapter_only_(checkpoint: dict[str, Any], module: pl.LightningModule) -> None:
    """Reduce a Lightning checkpoint dict to the adapter tensors and add the metadata.

    A module without adapters (a plain one fitted later by the same Trainer) is left whole.
    """
    keys = adapter_parameter_names(module)
    if not keys:
        return
    state = checkpoint.get("state_dict", {})
    checkpoint["state_dict"] = {
        k: state[k] if k in state else module.get_parameter(k).detach() for k in keys
    }
    metadata = build_metadata(module, keys, optimizer_param_names(attached_trainer(module), module))
    # Written during a validation pass, the file records the state training will go on from.
    metadata["rng"] = state_of(module).rng_before_validation or rng_state()
    trainer = attached_trainer(module)
    plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
    if state_of(module).quantized and plugin is not None and hasattr(plugin, "flag"):
        metadata["precision"] = plugin.flag  # how a model must be set up to load it
    # The chat template the batches were made with travels with the adapters (export).
    tokenizer = held_tokenizer(
        getattr(trainer, "datamodule", None), module, needs="apply_chat_template"
    )
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        metadata["chat_template"] = tokenizer.chat_template
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
    if prefix != "":  # the LightningModule itself, called once before any child loads
        return
    if check_if_adapter_only(module, state_dict):
        return
    trainer = attached_trainer(module)
    if trainer is not None and trainer.ckpt_path:
        # Resuming from a full Lightning checkpoint: the callback's own check comes only
        # after Lightning has copied the file's frozen tensors into the module. Refuse now.
        read_metadata({}, f"checkpoint {str(trainer.ckpt_path)!r}")


def accept_adapter_only_loading(module: pl.LightningModule) -> None:
    """Let Lightning load adapter-only state dicts into ``module``, checked strictly.

    Lightning calls ``load_state_dict(strict=module.strict_loading)``; frozen tensors are
    absent from adapter checkpoints, so loading must be non-strict, and this pre-hook puts
    the strictness back for the adapter tensors (keys and shapes) before anything is copied.
    """
    module.strict_loading = False
    if not state_of(module).load_check:
        module.register_load_state_dict_pre_hook(_check_before_load)
        state_of(module).load_check = True


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
    the RNG: a run resumed after a whole epoch draws the next epoch's DataLoader seed after
    it (the sanity check in between is neutral, see :func:`hold_rng_for_validation`), as the
    uninterrupted run did; where Lightning makes that iterator later (a checkpoint written
    before the epoch's validation), the state goes back again just before. A run resumed
    mid-epoch creates and positions an iterator the uninterrupted run did not, so there the
    state goes back before its first batch. (Measured on Lightning 2.6; the tests in
    ``tests/lightning/test_resume.py`` pin each path.)
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._metadata: dict[str, Any] | None = None
        self._source = "the checkpoint"
        self._optimizers_ready = False
        self._resumed_rng: dict[str, Any] | None = None
        self._at_epoch_end = True
        self._epoch_iterator_pending = False

    def on_load(
        self, trainer: pl.Trainer | None, module: nn.Module, checkpoint: dict[str, Any]
    ) -> None:
        source = (
            f"checkpoint {str(trainer.ckpt_path)!r}"
            if trainer is not None and trainer.ckpt_path
            else "the checkpoint"
        )
        metadata = read_metadata(checkpoint, source)
        precision = metadata.get("precision")
        if isinstance(precision, str) and not state_of(module).quantized:
            raise AdapterStateError(
                f"{source} was trained over a quantized base (precision={precision!r}), and "
                f"this {type(module).__name__}'s base is not quantized"
                + (" (it has no Trainer)" if trainer is None else "")
                + ". Load it through a Trainer that quantizes the same way, e.g. "
                f"lightning_peft.Trainer(precision={precision!r}).validate(module, "
                "ckpt_path=...) (or .test / .predict / .fit)."
            )
        check_base_fingerprint(metadata, module, source)
        self._metadata, self._source = metadata, source
        progress = checkpoint.get("loops", {}).get("fit_loop", {})
        batches = progress.get("epoch_loop.batch_progress", {})
        # A checkpoint from before the first batch (a tuner's, restored once it has searched)
        # starts an epoch: nothing of it was seen.
        started = batches.get("total", {}).get("ready", 1) > 0
        self._at_epoch_end = batches.get("is_last_batch", True) or not started
        if self._optimizers_ready:  # strategies that restore after setup (FSDP) load late
            self._finish(trainer, module)

    def on_fit_start(self, trainer: pl.Trainer, module: nn.Module) -> None:
        merged = [n for n, m in adapter_modules(module) if is_merged(m)]
        if merged:
            raise AdapterStateError(
                f"the adapters of {', '.join(merged[:3])}{' ...' if len(merged) > 3 else ''} "
                "are merged into their base layers (merge_adapters), so nothing would train: "
                "call unmerge_adapters(model) before fit"
            )
        keep_trainable_in_optimizers_(trainer, module)
        self._optimizers_ready = True
        if self._metadata is not None:
            self._finish(trainer, module)
        hold_rng_for_validation(module)  # the sanity check comes next

    def on_train_start(self, trainer: pl.Trainer, module: nn.Module) -> None:
        if self._resumed_rng is None:
            return
        if not self._at_epoch_end:
            if not _is_stateful(trainer.train_dataloader):
                rank_zero_warn(_MID_EPOCH_WARNING.format(source=self._source))
        elif trainer.fit_loop.restarting and (
            _validates(trainer) or _is_stateful(trainer.train_dataloader)
        ):
            # After this hook Lightning restarts the validation loop the checkpoint was written
            # before (without its hooks: one iterator, one draw), or puts a stateful loader
            # back in place (a new iterator): draws the uninterrupted run did not make where
            # the next epoch's iterator drew its base seed. Start them from the saved state.
            # Epoch-based runs (max_epochs, no max_steps) resumed from a finished epoch do
            # not restart: the next epoch's iterator was built from the restored state
            # before this hook, so the state is left as its draws left it.
            self._epoch_iterator_pending = True
            set_rng_state(self._resumed_rng)
        else:
            self._resumed_rng = None  # the next epoch's iterator drew from it already

    def on_train_epoch_start(self) -> None:
        """Where Lightning does call this hook before the next epoch's iterator, put the
        state back there too: restoring a stateful DataLoader's position drew from it."""
        if self._resumed_rng is not None and self._epoch_iterator_pending:
            set_rng_state(self._resumed_rng)

    def on_train_batch_start(self, module: nn.Module) -> None:
        """The first batch of a run resumed mid-epoch starts from the checkpoint's RNG state:
        restoring the DataLoader's position drew from it, the uninterrupted run did not."""
        forget_held_rng(module)
        resumed, self._resumed_rng = self._resumed_rng, None
        self._epoch_iterator_pending = False
        if resumed is not None and not self._at_epoch_end:
            set_rng_state(resumed)

    def _finish(self, trainer: pl.Trainer | None, module: nn.Module) -> None:
        assert self._metadata is not None
        saved = self._metadata["optimizer_param_names"]
        if trainer is not None and saved:  # written outside fit: no optimizer state to match
            check_optimizer_names(saved, optimizer_param_names(trainer, module), self._source)
        if "rng" in self._metadata:
            self._resumed_rng = self._metadata["rng"]
            set_rng_state(self._resumed_rng)
            hold_rng_for_validation(module)
        self._metadata = None


_MID_EPOCH_WARNING = (
    "Resuming from {source}, written in the middle of an epoch, with a plain DataLoader: "
    "Lightning cannot tell where in the epoch it stopped, so the rest of this epoch sees "
    "other batches than an uninterrupted run would. For an exact resume mid-epoch, use "
    "torchdata's StatefulDataLoader (from torchdata.stateful_dataloader import "
    "StatefulDataLoader), a drop-in replacement whose position Lightning saves and restores."
)


def _validates(trainer: pl.Trainer) -> bool:
    """Whether this fit runs a validation loop (Lightning has set its loaders up by
    ``on_train_start``)."""
    return trainer.val_dataloaders is not None and sum(trainer.num_val_batches or [0]) > 0


def _is_stateful(loaders: Any) -> bool:
    """Whether every training DataLoader can save and restore its position."""
    flat = (
        loaders.values()
        if isinstance(loaders, dict)
        else (loaders if isinstance(loaders, (list, tuple)) else [loaders])
    )
    return all(callable(getattr(loader, "load_state_dict", None)) for loader in flat)
