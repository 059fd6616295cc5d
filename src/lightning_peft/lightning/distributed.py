"""Checks that keep data-parallel ranks from training silently on different models."""

from __future__ import annotations

import hashlib

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_peft.checkpoint import fingerprint_frozen
from lightning_peft.errors import AdapterStateError
from lightning_peft.injection import adapter_parameter_names


def adapter_layout(module: nn.Module) -> str:
    """A hash of the adapter tensors' names and shapes."""
    layout = [
        f"{name}:{tuple(module.get_parameter(name).shape)}"
        for name in adapter_parameter_names(module)
    ]
    return hashlib.sha256("\n".join(layout).encode()).hexdigest()


def check_ranks_agree(trainer: pl.Trainer, module: nn.Module) -> None:
    """Stop every rank with the same message unless all hold the same frozen base (weights
    and quantization constants) and the same adapter layout.

    ``DistributedDataParallel`` broadcasts rank 0's parameters, 4-bit codes included, but
    not their quantization constants: ranks that loaded different bases would train on
    different models while their averaged gradients hide it.
    """
    distributed = torch.distributed
    if trainer.world_size <= 1 or not (distributed.is_available() and distributed.is_initialized()):
        return
    mine = (fingerprint_frozen(module), adapter_layout(module))
    everyone: list[tuple[str, str] | None] = [None] * distributed.get_world_size()
    distributed.all_gather_object(everyone, mine)
    problems = []
    for what, index in (
        ("frozen base (weights and quantization constants)", 0),
        ("adapter layout", 1),
    ):
        values = [entry[index] for entry in everyone if entry is not None]  # all, gathered
        if len(set(values)) > 1:
            per_rank = ", ".join(f"rank {rank}: {value[:12]}" for rank, value in enumerate(values))
            problems.append(f"the {what} differs between ranks ({per_rank})")
    if problems:
        raise AdapterStateError(
            "ranks disagree before training: " + "; ".join(problems) + ". Every rank must build "
            "the same base model (load the same weights, or seed before building a random one) "
            "and attach the same adapters."
        )
