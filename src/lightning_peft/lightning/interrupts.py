"""``InterruptCheckpoint``: an interrupted or preempted run leaves a checkpoint to resume from.

Ctrl-C (SIGINT) reaches Lightning as ``KeyboardInterrupt``; a scheduler's preemption or
``kill`` (SIGTERM) as ``SIGTERMException``, raised by Lightning at the end of the training
batch it arrived in. Both call the callbacks' ``on_exception`` before the process ends; this
callback saves there (adapter-only and atomic, as every save under the package), and only
for those two: a run that failed on an error has nothing worth resuming from. Unlike
Lightning's ``OnExceptionCheckpoint`` it is no checkpointing callback (it works with
``enable_checkpointing=False``) and never removes the file: a later run may resume from it.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override


class InterruptCheckpoint(Callback):
    """Save ``dirpath/filename.ckpt`` when training is interrupted by SIGINT (Ctrl-C) or
    SIGTERM (preemption, ``kill``), once training has taken a step.

    Resume with ``trainer.fit(module, ckpt_path=...)`` (``--ckpt_path`` on the command line).
    A SIGTERM stops at the end of a training step, so that file resumes as a step
    checkpoint does. A Ctrl-C can land inside a step: that step is not taken, and its batch
    is one a ``StatefulDataLoader`` has already handed out, so the resumed run goes on
    after it (a plain DataLoader restarts the epoch's order, as on any mid-epoch resume).
    For a resume that loses nothing, stop runs with SIGTERM.

    Args:
        dirpath: the folder of the checkpoint.
        filename: its name, without ``.ckpt``.
    """

    def __init__(self, dirpath: str, filename: str = "interrupted") -> None:
        self.dirpath, self.filename = os.path.expanduser(str(dirpath)), filename
        self.saved: str | None = None

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.dirpath, f"{self.filename}.ckpt")

    @override
    def on_exception(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        exception = next(
            (a for a in (*args, *kwargs.values()) if isinstance(a, BaseException)), None
        )
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            return
        if trainer.state.fn != "fit" or trainer.global_step == 0:
            return  # nothing trained yet: nothing to resume
        trainer.save_checkpoint(self.ckpt_path)
        self.saved = self.ckpt_path
        signal = "SIGTERM" if isinstance(exception, SIGTERMException) else "Ctrl-C (SIGINT)"
        rank_zero_info(
            f"{signal} at step {trainer.global_step}: saved {self.ckpt_path}; resume with "
            f"ckpt_path={self.ckpt_path!r} (--ckpt_path on the command line)"
        )
