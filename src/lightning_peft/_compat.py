"""Every private name of another library this package uses, in one place.

Lightning, torch, bitsandbytes, transformers and LitServe offer no public seam for these (the
reason is beside each; ``docs/private-apis.md`` lists them). Each is reached through this
module only, and ``tests/test_compat.py`` asserts that every name below still exists on the
installed versions: an upgrade that removes one fails there, by name, instead of deep
inside a resume or a serving test. Elsewhere the package uses public APIs only (a test
scans the source for private names of these libraries outside this file).
"""

from __future__ import annotations

import functools
from importlib import import_module
from typing import Any

import torch
from torch import nn

from lightning_peft.errors import LightningPeftError


class MissingPrivateAPI(LightningPeftError, RuntimeError):
    """A library no longer has a private name this package relies on."""


def _private(owner: Any, name: str, library: str) -> Any:
    try:
        return getattr(owner, name)
    except AttributeError:
        version = getattr(import_module(library), "__version__", "?")
        raise MissingPrivateAPI(
            f"lightning_peft relies on {library}'s private {name!r}, which {library} {version} "
            "no longer has: install the versions of lightning_peft's requirements-lock.txt, or "
            "a lightning_peft release made for this one"
        ) from None


def _imported(module: str, name: str) -> Any:
    return _private(import_module(module), name, module.partition(".")[0])


# -- Lightning ---------------------------------------------------------------------------

# Private methods of Lightning classes this package overrides in subclasses, with the
# parameters it expects them to take. Each is the only place the behaviour can be changed:
#   ModelCheckpoint._save_checkpoint / _remove_checkpoint: a PEFT folder written and removed
#     beside each checkpoint ModelCheckpoint keeps (CheckpointIO also sees other saves);
#   LightningCLI._parse_ckpt_path: the adapter config read from --ckpt_path before the model
#     is built (the public hooks run after);
#   ModelSummary._summary: counts of 4-bit weights (the summary object is built there).
OVERRIDDEN = {
    ("lightning.pytorch.callbacks", "ModelCheckpoint", "_save_checkpoint"): (
        "self",
        "trainer",
        "filepath",
    ),
    ("lightning.pytorch.callbacks", "ModelCheckpoint", "_remove_checkpoint"): (
        "self",
        "trainer",
        "filepath",
    ),
    ("lightning.pytorch.cli", "LightningCLI", "_parse_ckpt_path"): ("self",),
    ("lightning.pytorch.callbacks", "ModelSummary", "_summary"): ("self", "trainer", "pl_module"),
}

# The key LightningCLI writes into saved hyperparameters to rebuild the model class.
CLI_CLASS_PATH_KEY = "_class_path"


def attached_trainer(module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or None (``module.trainer`` raises
    when there is none, and a module outside any Trainer is a normal case here)."""
    return getattr(module, "_trainer", None)


def batches_that_stepped(trainer: Any) -> int:
    """Optimizer steps whose batches Lightning logged: the step loggers use for their x axis
    (``global_step`` counts optimizers; no public property gives the loggers' step)."""
    return int(_private(trainer.fit_loop.epoch_loop, "_batches_that_stepped", "lightning"))


def summary_max_depth(callback: Any) -> int:
    """``ModelSummary(max_depth=...)``'s value (the callback stores it only privately)."""
    return int(_private(callback, "_max_depth", "lightning"))


def is_spawn_launcher(launcher: Any) -> bool:
    """True for the launcher of ``strategy="ddp_spawn"`` (processes that return the module to
    the launching process by pickling its state dict; no public flag tells it apart)."""
    spawn = _imported(
        "lightning.pytorch.strategies.launchers.multiprocessing", "_MultiProcessingLauncher"
    )
    return isinstance(launcher, spawn)


def wraps_checkpoint_io(io: Any) -> bool:
    """True for a CheckpointIO that wraps another (``AsyncCheckpointIO``)."""
    return isinstance(
        io, _imported("lightning.pytorch.plugins.io.wrapper", "_WrappingCheckpointIO")
    )


def rewrap_checkpoint_io(io: Any, inner: Any) -> None:
    """Make a wrapping CheckpointIO wrap ``inner`` instead (its public setter takes a base only
    once, and Lightning has already given it one)."""
    _private(io, "_checkpoint_io", "lightning")
    io._checkpoint_io = inner


def saves_distributed_checkpoint(strategy: Any) -> bool:
    """``ModelParallelStrategy(save_distributed_checkpoint=...)`` (no public property)."""
    return bool(_private(strategy, "_save_distributed_checkpoint", "lightning"))


def fsdp_state_dict_type(strategy: Any) -> str:
    """``FSDPStrategy(state_dict_type=...)`` (no public property)."""
    return str(_private(strategy, "_state_dict_type", "lightning"))


# -- torch -------------------------------------------------------------------------------


def no_incompatible_keys() -> Any:
    """What ``nn.Module.load_state_dict`` returns when every key matched (its type is
    private; Lightning and users read ``.missing_keys`` from it)."""
    return _imported("torch.nn.modules.module", "_IncompatibleKeys")([], [])


def own_children(module: nn.Module) -> dict[str, Any]:
    """``module``'s direct children by the names it holds them under, the same child under
    each name (``named_children`` reports a child held twice once)."""
    return _private(module, "_modules", "torch")


def own_names(module: nn.Module) -> set[str]:
    """Names of ``module``'s own children, parameters and buffers, None entries included
    (a ``bias=False`` layer holds ``bias`` as None)."""
    return (
        set(own_children(module))
        | set(_private(module, "_parameters", "torch"))
        | set(_private(module, "_buffers", "torch"))
    )


def own_parameter(module: nn.Module, name: str) -> Any:
    """``module``'s own parameter ``name`` (None when it holds none, or holds None)."""
    return _private(module, "_parameters", "torch").get(name)


def track_step_for_schedulers(optimizer: torch.optim.Optimizer) -> None:
    """Give ``optimizer.step`` the wrapper ``LRScheduler.__init__`` gives it, so a scheduler
    moved onto this optimizer still notices a step taken before the optimizer's (torch
    keeps both flags private and offers no way to attach a scheduler after construction)."""
    step = optimizer.step
    if hasattr(step, "_wrapped_by_lr_sched"):
        return

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        optimizer._opt_called = True  # type: ignore[attr-defined]
        return step(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]


# -- bitsandbytes, transformers, LitServe ----------------------------------------------------


def unpack_cpu_4bit(packed: torch.Tensor, quant_state: Any) -> tuple[torch.Tensor, Any]:
    """bitsandbytes' inverse of its CPU (AVX512-BF16) inference packing of a 4-bit weight
    (public APIs undo it only as a side effect of ``state_dict()`` or a move to CUDA)."""
    inverse = _imported("bitsandbytes.functional", "_convert_weight_packed_for_cpu_inverse")
    return inverse(packed, quant_state)


def pack_cpu_4bit(weight: torch.Tensor, quant_state: Any) -> tuple[torch.Tensor, Any]:
    """bitsandbytes' CPU (AVX512-BF16) inference packing of a 4-bit weight, which it applies
    itself only inside an eval-mode forward, in place and for good (no public function)."""
    pack = _imported("bitsandbytes.functional", "_convert_weight_packed_for_cpu")
    return pack(weight, quant_state)


def keep_in_fp32_modules(model: nn.Module) -> tuple[str, ...]:
    """Module names a transformers model class keeps in float32 (T5's ``wo``); the attribute
    is a class-level private of ``PreTrainedModel``, None on most classes."""
    return tuple(getattr(model, "_keep_in_fp32_modules", None) or ())


def litserve_request_handler(api: Any, server: Any) -> Any:
    """LitServe's handler that puts a body on the worker queue and awaits the answer (not
    exported; custom routes that reach the worker have no public way in)."""
    return _imported("litserve.server", "RegularRequestHandler")(api, server)
