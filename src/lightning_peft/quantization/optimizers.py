"""Optimizers for adapter training, by name, including bitsandbytes' 8-bit and paged ones."""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch

OptimizerName = Literal["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw"]
OPTIMIZER_NAMES: tuple[str, ...] = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw")
# Hyperparameters that carry over from the optimizer a module configured (Adam family).
_CARRIED = ("lr", "betas", "eps", "weight_decay", "initial_lr")


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class for ``name``.

    Raises:
        ValueError: an unknown name (the valid ones are listed).
    """
    if name == "adamw":
        return torch.optim.AdamW
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"optimizer must be one of {OPTIMIZER_NAMES}, got {name!r}")
    import bitsandbytes as bnb

    return {
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
    }[name]


def rebuild_optimizer(
    optimizer: torch.optim.Optimizer, name: str, **kwargs: Any
) -> torch.optim.Optimizer:
    """A new optimizer of kind ``name`` over ``optimizer``'s trainable parameters.

    Each parameter group keeps its learning rate, betas, eps and weight decay (and the
    ``initial_lr`` schedulers read), so a scheduler rebound with :func:`rebind_scheduler`
    continues as configured. Frozen parameters are left out. ``kwargs`` go to the new class
    (e.g. ``min_8bit_size``: bitsandbytes keeps tensors smaller than 4096 elements in 32 bit).
    """
    cls = optimizer_class(name)
    groups = []
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.requires_grad]
        groups.append({"params": params, **{k: group[k] for k in _CARRIED if k in group}})
    if not any(group["params"] for group in groups):
        raise ValueError("the optimizer has no trainable parameter to rebuild over")
    return cls(groups, **kwargs)


def rebind_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Point an LR scheduler at ``optimizer``, as if it had been built with it.

    ``LRScheduler.__init__`` wraps ``optimizer.step`` to notice a scheduler stepped before
    its optimizer; the new optimizer gets the same wrapper (deliberately the same code).
    """
    scheduler.optimizer = optimizer
    step = optimizer.step
    if hasattr(step, "_wrapped_by_lr_sched"):
        return

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        optimizer._opt_called = True  # type: ignore[attr-defined]
        return step(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]
