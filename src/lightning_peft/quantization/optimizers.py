"""Optimizers for adapter training, by name, including bitsandbytes' 8-bit and paged ones."""

from __future__ import annotations

from typing import Any, Literal

import torch

from lightning_peft._compat import track_step_for_schedulers

OptimizerName = Literal["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw"]
OPTIMIZER_NAMES: tuple[str, ...] = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw")
_ADAMW_HINT = (
    "; configure torch.optim.AdamW for QLoRA's 8-bit optimizer state, or pass optimizer=None "
    "to keep this one without a note"
)
# Keys of torch's parameter groups that choose its implementation, not the algorithm.
_TORCH_SWITCHES = ("foreach", "fused", "capturable", "differentiable", "decoupled_weight_decay")


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


def why_not_rebuilt(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer`` cannot become a bitsandbytes AdamW without changing what it computes,
    or None when it can.

    bitsandbytes' Adam kernels decay weights decoupled (AdamW), have no AMSGrad and no
    ``maximize``, and run on plain tensors only: a torch ``AdamW``, or an ``Adam`` without
    weight decay, carries over exactly; anything else is another algorithm.
    """
    kind = type(optimizer)
    if kind not in (torch.optim.Adam, torch.optim.AdamW):
        return f"{kind.__name__} is not Adam or AdamW{_ADAMW_HINT}"
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("maximize"):
            return f"{kind.__name__}(amsgrad/maximize) has no bitsandbytes counterpart{_ADAMW_HINT}"
        decoupled = kind is torch.optim.AdamW or group.get("decoupled_weight_decay", False)
        if not decoupled and group.get("weight_decay", 0):
            return (
                f"Adam(weight_decay={group['weight_decay']}) adds the decay to the gradient, "
                f"and bitsandbytes' Adam decays weights decoupled (AdamW){_ADAMW_HINT}"
            )
        if any(_is_sharded(param) for param in group["params"]):
            return (
                "its parameters are sharded (DTensor, FSDP2), which bitsandbytes' optimizers "
                "do not run on; torch's own optimizers do"
            )
    return None


def _is_sharded(tensor: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def rebuild_optimizer(
    optimizer: torch.optim.Optimizer, name: str, **kwargs: Any
) -> torch.optim.Optimizer:
    """A new optimizer of kind ``name`` over ``optimizer``'s trainable parameters.

    Each parameter group keeps every key it has besides its parameters (learning rate, betas,
    eps, weight decay, what schedulers stored there such as ``initial_lr`` or ``max_lr``,
    and the user's own, such as ``name``), so schedulers rebound with :func:`rebind_schedulers`
    continue as configured. Frozen parameters are left out. ``kwargs`` go to the new class
    (e.g. ``min_8bit_size``: bitsandbytes keeps tensors smaller than 4096 elements in 32 bit).

    Raises:
        ValueError: ``optimizer`` is not one that carries over (:func:`why_not_rebuilt`), or
            it has no trainable parameter.
    """
    reason = why_not_rebuilt(optimizer)
    if reason is not None:
        raise ValueError(f"cannot rebuild the optimizer as {name!r}: {reason}")
    cls = optimizer_class(name)
    groups = []
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.requires_grad]
        # torch's own switches (foreach, fused, capturable, ...) mean nothing to another class.
        carried = {k: v for k, v in group.items() if k != "params" and k not in _TORCH_SWITCHES}
        groups.append({**carried, "params": params})
    if not any(group["params"] for group in groups):
        raise ValueError("the optimizer has no trainable parameter to rebuild over")
    return cls(groups, **kwargs)


def rebind_schedulers(
    scheduler: Any, old: torch.optim.Optimizer, new: torch.optim.Optimizer
) -> None:
    """Point ``scheduler`` and every scheduler inside it (``SequentialLR``'s and
    ``ChainedScheduler``'s children, a user's own nesting) from ``old`` to ``new``."""
    seen: set[int] = set()

    def visit(candidate: Any) -> None:
        if id(candidate) in seen or not hasattr(candidate, "optimizer"):
            return
        seen.add(id(candidate))
        if candidate.optimizer is old:
            _rebind_scheduler(candidate, new)
        for value in vars(candidate).values():
            for inner in value if isinstance(value, (list, tuple)) else (value,):
                visit(inner)

    visit(scheduler)


def _rebind_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Point an LR scheduler at ``optimizer``, as if it had been built with it."""
    scheduler.optimizer = optimizer
    track_step_for_schedulers(optimizer)
