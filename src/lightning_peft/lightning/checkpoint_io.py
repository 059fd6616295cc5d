"""Checkpoint files: adapter-only contents, atomic writes, clear refusals of damaged files.

Every save a Trainer makes goes through its strategy's ``save_checkpoint``, on every rank,
on the calling thread, after all hooks ran: ``ModelCheckpoint``'s, ``trainer.save_checkpoint``
and weights-only saves too (for which Lightning calls neither the callbacks' nor the
precision plugin's ``on_save_checkpoint``), under single-device, DDP and FSDP strategies.
So that is where a checkpoint becomes adapter-only, once, whichever of ``PeftCallback``,
``PeftMixin`` or ``PeftPrecision`` set it up. Every rank takes part (the base fingerprint
gathers sharded tensors under FSDP2), and the frozen base is gone before
``AsyncCheckpointIO`` copies the dict for its thread.
Strategies that write sharded folders are refused (their loader wants every tensor back), and
so is DeepSpeed, whose engine writes its own files with the frozen parameters in them.

Writing the file is Lightning's own extension point, a ``CheckpointIO``:
:class:`AtomicCheckpointIO` sits innermost (under ``AsyncCheckpointIO``, the rename then
follows the write in its thread), so a file appears whole or not at all.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from fsspec.utils import get_protocol
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from typing_extensions import override

from lightning_peft._compat import (
    fsdp_state_dict_type,
    rewrap_checkpoint_io,
    saves_distributed_checkpoint,
    wraps_checkpoint_io,
)
from lightning_peft.checkpoint import atomic_path
from lightning_peft.errors import AdapterConfigError, AdapterStateError
from lightning_peft.lightning.checkpointing import write_adapter_only_
from lightning_peft.lightning.compatibility import refuse_callbacks_that_break_adapters


class _AdapterOnlySaves:
    """Stands in for a strategy's ``save_checkpoint``: reduces the checkpoint to the adapters
    of the strategy's module (tensors and metadata), then saves it as the strategy would.

    A callable object holding the class's function, not a closure or a bound method, so the
    strategy still pickles and unpickles (``ddp_spawn``).
    """

    def __init__(self, strategy: pl.strategies.Strategy) -> None:
        self.strategy = strategy
        self.save: Callable[..., None] = type(strategy).save_checkpoint

    def __call__(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        module = self.strategy.lightning_module
        if module is not None:
            write_adapter_only_(checkpoint, module)
        self.save(self.strategy, checkpoint, filepath, storage_options=storage_options)


class AtomicCheckpointIO(CheckpointIO):
    """Any ``CheckpointIO`` whose local writes become temp file + rename.

    Remote paths (``s3://``, ...) go to the wrapped one unchanged: object stores write each
    object whole already, and have no rename.
    """

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if get_protocol(str(path)) != "file":
            self.inner.save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_path(path) as temporary:
            self.inner.save_checkpoint(checkpoint, temporary, storage_options)

    @override
    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The wrapped IO's load; a file that is not a whole checkpoint is named as such."""
        try:
            return self.inner.load_checkpoint(path, map_location, weights_only)
        except FileNotFoundError:
            raise
        except pickle.UnpicklingError as error:
            if "Weights only load failed" not in str(error):
                raise _damaged(path, error) from error
            raise AdapterStateError(
                f"checkpoint {str(path)!r} holds objects that loading with weights_only=True "
                f"refuses (torch names them below). If the file is yours: allow their classes "
                "with torch.serialization.add_safe_globals([...]) before loading (lightning_peft's "
                "adapter configs are allowed already), or pass weights_only=False to fit/load "
                f"only for files you trust.\n{error}"
            ) from error
        except (EOFError, OSError, RuntimeError) as error:
            raise _damaged(path, error) from error

    @override
    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    @override
    def teardown(self) -> None:
        self.inner.teardown()


def _damaged(path: Any, error: Exception) -> AdapterStateError:
    return AdapterStateError(
        f"checkpoint {str(path)!r} is truncated or damaged ({type(error).__name__}: "
        f"{error}); resume from another one (AdapterCheckpoint's files are written "
        "whole or not at all, so a half file comes from elsewhere)"
    )


def make_checkpoints_adapter_only(trainer: pl.Trainer) -> None:
    """Make every checkpoint ``trainer`` saves adapter-only, and its writes atomic; once.

    Raises:
        AdapterConfigError: the strategy writes sharded checkpoint folders, which Lightning
            reloads by matching every tensor of the model: adapters alone would not load; or
            a callback would change the frozen base (:func:`refuse_callbacks_that_break_adapters`).
    """
    strategy = trainer.strategy
    _refuse_sharded_saves(strategy)
    refuse_callbacks_that_break_adapters(trainer)
    installed = strategy.__dict__.get("save_checkpoint")
    if not (isinstance(installed, _AdapterOnlySaves) and installed.strategy is strategy):
        # On the instance: any strategy class, the user's own included.
        strategy.save_checkpoint = _AdapterOnlySaves(strategy)  # type: ignore[method-assign]
    io: Any = strategy.checkpoint_io
    if wraps_checkpoint_io(io):  # AsyncCheckpointIO
        if io.checkpoint_io is not None and not isinstance(io.checkpoint_io, AtomicCheckpointIO):
            rewrap_checkpoint_io(io, AtomicCheckpointIO(io.checkpoint_io))
    elif not isinstance(io, AtomicCheckpointIO):
        strategy.checkpoint_io = AtomicCheckpointIO(io)


def _refuse_sharded_saves(strategy: pl.strategies.Strategy) -> None:
    if isinstance(strategy, DeepSpeedStrategy):
        raise AdapterConfigError(
            f"{type(strategy).__name__}: DeepSpeed's engine writes its own checkpoint files, "
            "the frozen base in each, and reloads them whole, so they cannot be adapter-only. "
            "Use strategy='ddp', or FSDP2 (lightning_peft.AdapterModelParallelStrategy) to "
            "shard a model that does not fit one device"
        )
    sharded = None
    if isinstance(strategy, ModelParallelStrategy) and saves_distributed_checkpoint(strategy):
        sharded = "save_distributed_checkpoint=True"
        fix = (
            "use lightning_peft.AdapterModelParallelStrategy (same arguments; it gathers only "
            "the adapters) or pass save_distributed_checkpoint=False"
        )
    elif isinstance(strategy, FSDPStrategy) and fsdp_state_dict_type(strategy) == "sharded":
        sharded = "state_dict_type='sharded'"
        fix = "pass state_dict_type='full': the adapter file is small"
    if sharded is not None:
        raise AdapterConfigError(
            f"{type(strategy).__name__}({sharded}) writes sharded checkpoint folders, which "
            "Lightning reloads by matching every tensor of the model, frozen base included, "
            f"so adapter-only ones would not load: {fix}"
        )
