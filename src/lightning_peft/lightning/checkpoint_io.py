"""Checkpoint files through Lightning's own extension point, a ``CheckpointIO``: adapter-only
contents, atomic writes, clear refusals of damaged files.

Every save a Trainer makes passes through its strategy's ``CheckpointIO``, on the calling
thread: ``ModelCheckpoint``'s, ``trainer.save_checkpoint(path)`` and
``trainer.save_checkpoint(path, weights_only=True)`` (for which Lightning calls neither the
callbacks' nor the precision plugin's ``on_save_checkpoint``). So that is where a checkpoint
becomes adapter-only, once, whichever of ``PeftCallback``, ``PeftMixin`` or ``PeftPrecision``
put the IO there. Two wrappers, because their places differ:

- :class:`AdapterOnlyCheckpointIO` sits outermost: the dict is reduced before
  ``AsyncCheckpointIO`` copies it for its background thread (the frozen base is never copied).
- :class:`AtomicCheckpointIO` sits innermost: a file appears whole or not at all (temporary
  file + rename), and under ``AsyncCheckpointIO`` the rename follows the write in its thread.
"""

from __future__ import annotations

import pickle
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from typing_extensions import override

from lightning_peft.checkpoint import atomic_path
from lightning_peft.errors import AdapterStateError
from lightning_peft.injection import adapter_parameter_names
from lightning_peft.lightning.checkpointing import write_adapter_only_


class _Delegating(CheckpointIO):
    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options)

    @override
    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return self.inner.load_checkpoint(path, map_location, weights_only)

    @override
    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    @override
    def teardown(self) -> None:
        self.inner.teardown()


class AdapterOnlyCheckpointIO(_Delegating):
    """Reduce each checkpoint to the adapters (tensors, metadata) of the strategy's module.

    A module without adapters (a plain one fitted later by the same Trainer) is saved whole.
    """

    def __init__(self, inner: CheckpointIO, strategy: pl.strategies.Strategy) -> None:
        super().__init__(inner)
        self.strategy = strategy

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        module = self.strategy.lightning_module
        if module is not None and adapter_parameter_names(module):
            write_adapter_only_(checkpoint, module)
        super().save_checkpoint(checkpoint, path, storage_options)


class AtomicCheckpointIO(_Delegating):
    """Any ``CheckpointIO`` whose local writes become temp file + rename.

    Remote paths (``s3://``, ...) go to the wrapped one unchanged: object stores write each
    object whole already, and have no rename.
    """

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if not _is_local_file_protocol(str(path)):
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
        except (EOFError, OSError, RuntimeError, pickle.UnpicklingError) as error:
            raise AdapterStateError(
                f"checkpoint {str(path)!r} is truncated or damaged ({type(error).__name__}: "
                f"{error}); resume from another one (AdapterCheckpoint's files are written "
                "whole or not at all, so a half file comes from elsewhere)"
            ) from error


def install_checkpoint_io(trainer: pl.Trainer) -> None:
    """Wrap ``trainer``'s checkpoint IO: adapter-only outermost, atomic innermost; once."""
    strategy = trainer.strategy
    outer = strategy.checkpoint_io
    if isinstance(outer, AdapterOnlyCheckpointIO):
        return
    if isinstance(outer, _WrappingCheckpointIO):  # AsyncCheckpointIO
        if outer.checkpoint_io is not None and not isinstance(
            outer.checkpoint_io, AtomicCheckpointIO
        ):
            # The public setter only takes a base once; this wraps the base it took.
            outer._checkpoint_io = AtomicCheckpointIO(outer.checkpoint_io)
    elif not isinstance(outer, AtomicCheckpointIO):
        outer = AtomicCheckpointIO(outer)
    strategy.checkpoint_io = AdapterOnlyCheckpointIO(outer, strategy)
