"""Lightning callbacks that cannot work over a frozen (or 4-bit) base with adapter-only
checkpoints, refused when training is set up, each with the reason and what to use instead."""

from __future__ import annotations

from typing import Any, cast

import lightning.pytorch as pl
from lightning.pytorch import callbacks as lightning_callbacks

from lightning_peft.errors import AdapterConfigError

_AVERAGES_EVERYTHING = (
    "averages every tensor of the module: the frozen base would drift by rounding (a 4-bit "
    "base's packed codes are averaged as numbers and corrupted) and every checkpoint would "
    "hold the whole averaged model, which adapter-only resume cannot load"
)
# Callback class name -> (why it breaks adapter training, what to use instead).
_REFUSED = {
    "WeightAveraging": (
        _AVERAGES_EVERYTHING,
        "use lightning_peft.lightning.AdapterWeightAveraging(decay=0.999), which averages the "
        "adapters only",
    ),
    "StochasticWeightAveraging": (
        _AVERAGES_EVERYTHING,
        "use lightning_peft.lightning.AdapterWeightAveraging(decay=None) (SWA's running mean, "
        "over the adapters only), with torch.optim.swa_utils.SWALR in configure_optimizers "
        "for SWA's learning rate",
    ),
    "ModelPruning": (
        "re-parametrizes the pruned weights (weight_orig and a mask) of every layer it selects, "
        "the frozen base's by default, which adapter wrappers and adapter-only checkpoints do "
        "not hold",
        "prune the merged model after training (merge_and_export) instead",
    ),
    "BackboneFinetuning": (
        "makes every tensor of the backbone trainable at its epoch, the frozen base weights "
        "included: the base would start training and later checkpoints would not resume",
        "leave it out (the backbone's adapters train from the start), or give the backbone's "
        "adapters their own parameter group whose learning rate a LambdaLR keeps at 0 until "
        "that epoch",
    ),
}


def refuse_callbacks_that_break_adapters(trainer: pl.Trainer) -> None:
    """Refuse Lightning callbacks that would train or rewrite the frozen base.

    Raises:
        AdapterConfigError: naming the callback, why, and the alternative.
    """
    for callback in cast(Any, trainer).callbacks:  # set by Lightning, not declared
        for name, (why, instead) in _REFUSED.items():
            refused = getattr(lightning_callbacks, name, None)
            if refused is not None and isinstance(callback, refused):
                raise AdapterConfigError(
                    f"{type(callback).__name__} cannot be used with adapters: it {why}. "
                    f"Instead, {instead}."
                )
