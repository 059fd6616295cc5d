"""Atomic checkpoint writes (and clear refusals of damaged files) through Lightning's own
extension point, a ``CheckpointIO``.

A file a Trainer writes appears whole or not at all: :class:`AtomicCheckpointIO` writes to a
hidden file beside the target and renames it into place. It sits innermost, under whatever
wraps the strategy's ``CheckpointIO`` (``AsyncCheckpointIO`` writes in a background thread:
the rename then happens there, after the write, not before it as a rename done by the
callback would).
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

    @override
    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    @override
    def teardown(self) -> None:
        self.inner.teardown()


def make_checkpoint_writes_atomic(trainer: pl.Trainer) -> None:
    """Put an :class:`AtomicCheckpointIO` innermost in ``trainer``'s checkpoint IO, once."""
    strategy = trainer.strategy
    outer = strategy.checkpoint_io
    if isinstance(outer, _WrappingCheckpointIO):
        if outer.checkpoint_io is not None and not isinstance(
            outer.checkpoint_io, AtomicCheckpointIO
        ):
            # The public setter only takes a base once; this wraps the base it took.
            outer._checkpoint_io = AtomicCheckpointIO(outer.checkpoint_io)
    elif not isinstance(outer, AtomicCheckpointIO):
        strategy.checkpoint_io = AtomicCheckpointIO(outer)
