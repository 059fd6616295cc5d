"""``PeftMixin``: a LightningModule that declares its adapters with ``configure_adapters``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from typing_extensions import override

from lightning_peft._compat import attached_trainer, no_incompatible_keys
from lightning_peft.adapters.init import values_to_be_loaded
from lightning_peft.adapters.inputs import find_transformers_model
from lightning_peft.checkpoint import load_adapter_state_dict
from lightning_peft.errors import UnsupportedLayerError
from lightning_peft.injection import AdapterConfig, as_config_list
from lightning_peft.lightning.attach import attach_adapters_once
from lightning_peft.lightning.checkpoint_io import make_checkpoints_adapter_only
from lightning_peft.lightning.checkpointing import (
    ResumeChecks,
    check_if_adapter_only,
    hold_rng_for_validation,
    release_rng_after_validation,
)
from lightning_peft.lightning.distributed import check_ranks_agree
from lightning_peft.lightning.module_state import state_of
from lightning_peft.lightning.summary import use_real_parameter_counts
from lightning_peft.quantization.model import quantize_like_


def put_adapted_model_in_train_mode(module: nn.Module) -> None:
    """``train()`` on the transformers model inside ``module`` (its other submodules, a
    frozen teacher say, keep their modes), or on ``module`` when it holds none."""
    try:
        find_transformers_model(module, "").train()
    except UnsupportedLayerError:
        module.train()


def enable_gradient_checkpointing(module: nn.Module) -> None:
    """Turn on transformers' activation (gradient) checkpointing for the model inside
    ``module``: layer activations are recomputed in the backward pass instead of kept.

    Non-reentrant checkpointing, so the frozen base's inputs need not require grad (the
    reentrant kind needs ``enable_input_require_grads``, as PEFT's
    ``prepare_model_for_kbit_training`` does); the key/value cache is turned off, which
    checkpointing cannot use. It acts only in train mode (see
    :func:`put_adapted_model_in_train_mode`).

    Raises:
        UnsupportedLayerError: no transformers model, or one without checkpointing support.
    """
    host = find_transformers_model(module, "gradient_checkpointing")
    options = {"use_reentrant": False}
    try:
        if hasattr(host, "activation_checkpointing_enable"):  # transformers 5.24+
            host.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            host.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    except (AttributeError, ValueError) as error:
        raise UnsupportedLayerError(
            f"{type(host).__name__} does not support gradient checkpointing ({error})"
        ) from error
    if getattr(host.config, "use_cache", False):
        host.config.use_cache = False


if TYPE_CHECKING:  # what the mixin is mixed into, for type checkers
    import lightning.pytorch as pl

    _MixedInto = pl.LightningModule
else:
    _MixedInto = object


class PeftMixin(_MixedInto):
    """Mix into a LightningModule (``class M(PeftMixin, L.LightningModule)``) to fine-tune it
    with adapters.

    Define ``configure_adapters()``; build the base model in ``__init__``. The mixin then

    - attaches the adapters in ``configure_model`` (before any checkpoint is restored) and
      freezes everything else;
    - keeps checkpoints adapter-only (adapter tensors, optimizer, scheduler, loops, RNG,
      metadata), also with ``save_weights_only=True``;
    - resumes exactly with ``trainer.fit(module, ckpt_path=...)`` and loads with
      ``M.load_from_checkpoint(path)``, refusing checkpoints that do not fit.

    If the module overrides ``configure_model``, ``on_save_checkpoint``, ``on_load_checkpoint``,
    ``on_fit_start``, ``on_train_start``, ``on_train_epoch_start``, ``on_train_batch_start``,
    ``on_train_batch_end``, ``on_validation_end``, ``setup`` or ``load_state_dict``, call
    ``super()`` there.
    """

    #: Put the adapted model in train mode when training starts (see ``PeftCallback``).
    adapted_model_train_mode: bool = True
    #: Recompute layer activations in the backward pass (see ``PeftCallback``).
    adapter_gradient_checkpointing: bool = False
    #: Train a transformers task class's new head with the adapters (see ``PeftCallback``).
    adapter_train_head: bool = True

    def configure_adapters(self) -> AdapterConfig | Sequence[AdapterConfig]:
        raise NotImplementedError(
            f"{type(self).__name__} uses PeftMixin but does not define configure_adapters(); "
            "return an adapter config from it, e.g. LoRA(rank=8, target_modules='all-linear')"
        )

    def _resume_checks(self) -> ResumeChecks:
        state = state_of(self)
        if state.resume is None:
            state.resume = ResumeChecks()
        return state.resume

    def _attach_adapters_once(self) -> bool:
        return attach_adapters_once(
            attached_trainer(self),
            self,
            lambda plugin: as_config_list(self.configure_adapters()),
            train_head=self.adapter_train_head,
        )

    @override
    def configure_model(self) -> None:
        if self._attach_adapters_once():
            if self.adapter_gradient_checkpointing:
                enable_gradient_checkpointing(self)
            if attached_trainer(self) is not None:
                check_ranks_agree(attached_trainer(self), self)
        super().configure_model()

    @override
    def setup(self, stage: str) -> None:
        if attached_trainer(self) is not None:
            use_real_parameter_counts(attached_trainer(self))
            make_checkpoints_adapter_only(attached_trainer(self))
        super().setup(stage)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The strategy's save reduces the checkpoint (see checkpoint_io). In the process that
        # launched ddp_spawn setup never ran, so the strategy is set up here: Lightning calls
        # this hook in every save, before it looks up the strategy's save_checkpoint.
        if attached_trainer(self) is not None:
            make_checkpoints_adapter_only(attached_trainer(self))
        super().on_save_checkpoint(checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resume_checks().on_load(attached_trainer(self), self, checkpoint)
        super().on_load_checkpoint(checkpoint)

    @override
    def on_fit_start(self) -> None:
        self._resume_checks().on_fit_start(self.trainer, self)
        # Before the sanity check (which puts back the modes it found) and before Lightning
        # counts eval-mode modules at the start of training.
        if self.adapted_model_train_mode:
            put_adapted_model_in_train_mode(self)
        super().on_fit_start()

    @override
    def on_train_start(self) -> None:
        self._resume_checks().on_train_start(self.trainer, self)
        super().on_train_start()

    @override
    def on_train_epoch_start(self) -> None:
        self._resume_checks().on_train_epoch_start()
        super().on_train_epoch_start()

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        self._resume_checks().on_train_batch_start(self)
        return super().on_train_batch_start(batch, batch_idx)

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        hold_rng_for_validation(self)

    @override
    def on_validation_end(self) -> None:
        if self.trainer.state.fn == "fit":
            release_rng_after_validation(self)
        super().on_validation_end()

    @override
    def load_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False
    ) -> Any:
        """An adapter-only state dict loads strictly into the adapters (keys and shapes
        checked before anything is copied); any other state dict loads as usual.

        Adapters are attached first if they are not yet: after ``ddp_spawn`` Lightning loads
        the workers' weights into this process's module, which never ran ``configure_model``
        (and whose base, under ``PeftPrecision``, is quantized first, as the state dict's is).
        """
        state = state_of(self)
        if not (state.attached or state.quantized) and quantize_like_(self, dict(state_dict)):
            state.quantized = True
        with values_to_be_loaded():  # the state dict brings the values (LoftQ's too)
            self._attach_adapters_once()
        if check_if_adapter_only(self, dict(state_dict)):
            load_adapter_state_dict(self, state_dict)
            return no_incompatible_keys()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
