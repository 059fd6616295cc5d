"""Callbacks: ``PeftCallback`` attaches adapters to an unchanged LightningModule;
``AdapterCheckpoint`` is a ``ModelCheckpoint`` whose files hold only the adapters."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_peft._compat import is_spawn_launcher
from lightning_peft.adapters import MethodConfig
from lightning_peft.checkpoint.io import held_tokenizer
from lightning_peft.checkpoint.peft_format import check_peft_exportable, save_peft
from lightning_peft.compiling import compile_layers
from lightning_peft.errors import AdapterConfigError
from lightning_peft.injection import AdapterConfig, as_config_list, is_adapter_config
from lightning_peft.lightning.attach import attach_adapters_once
from lightning_peft.lightning.checkpoint_io import make_checkpoints_adapter_only
from lightning_peft.lightning.checkpointing import (
    ResumeChecks,
    accept_adapter_only_loading,
    hold_rng_for_validation,
    release_rng_after_validation,
)
from lightning_peft.lightning.distributed import check_ranks_agree
from lightning_peft.lightning.mixin import (
    PeftMixin,
    enable_gradient_checkpointing,
    put_adapted_model_in_train_mode,
)
from lightning_peft.lightning.precision import PeftPrecision, default_adapters, peft_precision
from lightning_peft.lightning.summary import use_real_parameter_counts

_SPAWN_WARNING = (
    "PeftCallback under a spawning strategy (ddp_spawn): training runs in child processes and "
    "Lightning hands back to this process only weights its module already has, so the adapters "
    "attached in the children do not come back to it. Read them from an AdapterCheckpoint, use "
    "strategy='ddp', or use PeftMixin (which attaches its adapters in this process too)."
)


_SPAWN_QUANTIZED = (
    "PeftPrecision with PeftCallback under a spawning strategy (ddp_spawn) cannot hand the "
    "trained model back: Lightning loads the children's quantized, adapted weights into this "
    "process's module, whose base is neither quantized nor adapted here. Use strategy='ddp' "
    "(the script itself runs on every process), or a PeftMixin module (it quantizes and "
    "attaches in this process too)."
)


class _AdapterCheckpointHooks(Callback):
    """Write adapter-only checkpoints and check them on resume (see ``checkpointing``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resume = ResumeChecks()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        accept_adapter_only_loading(pl_module)
        make_checkpoints_adapter_only(trainer)
        use_real_parameter_counts(trainer)
        self._resume.reset()
        super().setup(trainer, pl_module, stage)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._resume.on_load(trainer, pl_module, checkpoint)
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resume.on_fit_start(trainer, pl_module)
        super().on_fit_start(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resume.on_train_start(trainer, pl_module)
        super().on_train_start(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resume.on_train_epoch_start()
        super().on_train_epoch_start(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._resume.on_train_batch_start(pl_module)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        hold_rng_for_validation(pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":
            release_rng_after_validation(pl_module)
        super().on_validation_end(trainer, pl_module)


class PeftCallback(_AdapterCheckpointHooks):
    """Attach adapters to an existing LightningModule and keep its checkpoints adapter-only.

    Adapters are attached in ``setup``, before any checkpoint is restored and before
    ``configure_optimizers`` runs; the base is frozen, and frozen parameters are dropped
    from the optimizers the module builds. Every checkpoint the Trainer writes then holds
    the adapter tensors, optimizer, scheduler, loop and RNG state, and metadata, and
    ``trainer.fit(module, ckpt_path=...)`` resumes from it exactly.

    With a ``PeftPrecision`` plugin on the Trainer, the base is quantized first, on the
    device it will train on. A ``PeftMixin`` module declares its own adapters; the callback
    then only keeps the checkpoints adapter-only.

    Args:
        adapters: one adapter config (``LoRA(...)``) or several, applied in order. Default:
            the ``PeftPrecision`` plugin's adapters, else LoRA rank 8 on all linear layers.
        name: the adapter name used in parameter names (``lora_A.<name>.weight``).
        gradient_checkpointing: recompute layer activations in the backward pass instead of
            keeping them (transformers models; less memory, more compute). Default: what the
            ``PeftPrecision`` plugin says, else off.
        train_mode: put the adapted model in train mode when training starts (Lightning
            keeps each submodule's mode, and ``from_pretrained`` returns a model in eval
            mode: its dropout and gradient checkpointing would stay off). Lightning's
            validation still switches it to eval and back. ``False`` leaves modes alone.
        train_head: train the head a transformers task class adds on top of its backbone
            (``classifier``, ``score``: random after ``from_pretrained``) with the adapters,
            as Hugging Face PEFT's ``modules_to_save`` does. ``False`` keeps it frozen.
        compile_layers: ``torch.compile`` each of the model's repeated blocks once the
            adapters are attached (:func:`lightning_peft.compiling.compile_layers`): ``True``
            for the default mode, a mode name (``"reduce-overhead"``: CUDA graphs, for
            launch-bound GPU steps; each step's start is marked for them), or a dict of
            ``torch.compile`` options. Train with ``use_cache=False``.

    Example::

        trainer = L.Trainer(callbacks=[PeftCallback(LoRA(rank=8, target_modules="all-linear"))])
    """

    def __init__(
        self,
        adapters: MethodConfig | Sequence[MethodConfig] | None = None,
        *,
        name: str = "default",
        gradient_checkpointing: bool | None = None,
        train_mode: bool = True,
        train_head: bool = True,
        compile_layers: bool | str | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        configs = [] if adapters is None else as_config_list(adapters)
        invalid = [c for c in configs if not is_adapter_config(c)]
        if (adapters is not None and not configs) or invalid:
            raise AdapterConfigError(
                "PeftCallback needs adapter configs such as LoRA(...), IA3() or BitFit(), got "
                f"{adapters!r}"
            )
        self.configs = configs
        self.name = name
        self.gradient_checkpointing = gradient_checkpointing
        self.train_mode = train_mode
        if not isinstance(train_head, bool):
            raise AdapterConfigError(f"train_head must be True or False, got {train_head!r}")
        self.train_head = train_head
        self.compile_options = _compile_options(compile_layers)

    def _configs_for(self, plugin: PeftPrecision | None) -> list[AdapterConfig]:
        return self.configs or as_config_list(
            (plugin.adapters if plugin else None) or default_adapters()
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(pl_module, PeftMixin):
            if self.configs:
                rank_zero_warn(
                    f"{type(pl_module).__name__} is a PeftMixin and declares its own adapters in "
                    "configure_adapters(); the adapters given to PeftCallback are not attached."
                )
        elif attach_adapters_once(
            trainer, pl_module, self._configs_for, self.name, self.train_head
        ):
            plugin = trainer.precision_plugin
            checkpointing = self.gradient_checkpointing
            if checkpointing is None:
                checkpointing = getattr(plugin, "gradient_checkpointing", False)
            if checkpointing:
                enable_gradient_checkpointing(pl_module)
            if self.compile_options is not None:
                compile_layers(pl_module, **self.compile_options)
            check_ranks_agree(trainer, pl_module)
            if is_spawn_launcher(trainer.strategy.launcher):
                if peft_precision(trainer) is not None:
                    raise AdapterConfigError(_SPAWN_QUANTIZED)
                rank_zero_warn(_SPAWN_WARNING)
        super().setup(trainer, pl_module, stage)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        # Before the sanity check (which puts back the modes it found) and before Lightning
        # counts eval-mode modules at the start of training.
        if self.train_mode and not isinstance(pl_module, PeftMixin):  # the mixin does its own
            put_adapted_model_in_train_mode(pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._mark_cuda_graph_step()

    @override
    def on_validation_batch_start(self, *args: Any, **kwargs: Any) -> None:
        super().on_validation_batch_start(*args, **kwargs)
        self._mark_cuda_graph_step()

    @override
    def on_predict_batch_start(self, *args: Any, **kwargs: Any) -> None:
        super().on_predict_batch_start(*args, **kwargs)
        self._mark_cuda_graph_step()

    def _mark_cuda_graph_step(self) -> None:
        if (self.compile_options or {}).get("mode") == "reduce-overhead":
            import torch

            # CUDA graphs reuse their output buffers: a new step may overwrite the last's.
            torch.compiler.cudagraph_mark_step_begin()


_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _compile_options(value: Any) -> dict[str, Any] | None:
    """``PeftCallback(compile_layers=...)`` as ``torch.compile`` options, or None (off)."""
    if value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, str) and value in _COMPILE_MODES:
        return {"mode": value}
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return dict(value)
    raise AdapterConfigError(
        f"compile_layers must be True, False, one of {_COMPILE_MODES} or a dict of "
        f"torch.compile options, got {value!r}"
    )


class AdapterCheckpoint(_AdapterCheckpointHooks, ModelCheckpoint):
    """A ``ModelCheckpoint`` (same arguments) whose files hold only the adapter tensors.

    Besides the adapters a file holds optimizer, scheduler, loop, callback and RNG state and
    metadata (adapter configs, trainable parameter names in optimizer order, a fingerprint of
    the frozen base, package versions). Files are written atomically through any
    ``CheckpointIO`` (``AsyncCheckpointIO`` too): to a hidden temporary file first, then
    renamed, so an interrupted save leaves the previous file intact.

    Args:
        export_peft: also write each checkpoint's adapter in the Hugging Face PEFT format, in
            a folder beside it (``epoch=0-step=100-peft/``), removed with its checkpoint.
        base_model_name_or_path: recorded in those folders' ``adapter_config.json``.
        tokenizer: saved in those folders too (files and chat template), so each works on
            its own. ``"auto"`` (default): the LightningModule's or the DataModule's
            ``tokenizer`` attribute (the DataModule's first), if either has one; ``None``: no
            tokenizer.
        *args, **kwargs: as for ``ModelCheckpoint``.
    """

    def __init__(
        self,
        *args: Any,
        export_peft: bool = False,
        base_model_name_or_path: str | None = None,
        tokenizer: Any = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.export_peft = export_peft
        self.base_model_name_or_path = base_model_name_or_path
        self.tokenizer = tokenizer

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.export_peft:  # before training, not at the first save
            try:
                check_peft_exportable(pl_module)
            except ValueError as error:
                raise AdapterConfigError(f"AdapterCheckpoint(export_peft=True): {error}") from error

    @staticmethod
    def peft_directory(filepath: str) -> Path:
        """Where the PEFT export of checkpoint ``filepath`` goes."""
        path = Path(filepath)
        return path.with_name(f"{path.stem}-peft")

    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)  # atomic: see AtomicCheckpointIO
        if self.export_peft and trainer.is_global_zero:
            save_peft(
                trainer.lightning_module,
                self.peft_directory(filepath),
                base_model_name_or_path=self.base_model_name_or_path,
                tokenizer=self._tokenizer(trainer),
            )

    def _tokenizer(self, trainer: pl.Trainer) -> Any:
        if not (isinstance(self.tokenizer, str) and self.tokenizer == "auto"):
            return self.tokenizer
        # The data module's first: it is the one the run's batches were made with (ChatData
        # may replace the chat template), as `lightning-peft export` chooses.
        datamodule = cast(Any, trainer).datamodule  # set by Lightning, not declared
        return held_tokenizer(datamodule, trainer.lightning_module)

    @override
    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if self.export_peft and trainer.is_global_zero:
            shutil.rmtree(self.peft_directory(filepath), ignore_errors=True)
