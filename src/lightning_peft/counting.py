"""Count trainable and frozen parameters, a 4-bit weight as the parameters it stands for."""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from lightning_peft.quantization.layers import real_numel


class ParameterCount(NamedTuple):
    trainable: int
    frozen: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable {self.trainable:,} | frozen {self.frozen:,} | total {self.total:,} "
            f"({100 * self.trainable_fraction:.3g}% trainable)"
        )


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and frozen parameter counts of ``model``.

    Shared (tied) tensors count once. A packed bitsandbytes 4-bit weight counts as the
    number of weights it encodes, not its byte count (which is half that).
    """
    trainable = frozen = 0
    for param in model.parameters():
        if param.requires_grad:
            trainable += real_numel(param)
        else:
            frozen += real_numel(param)
    return ParameterCount(trainable, frozen)
