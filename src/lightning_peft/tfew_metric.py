"""T-Few's rank-classification accuracy as a torchmetrics ``Metric``.

Apart from :mod:`lightning_peft.tfew` so that ``import lightning_peft`` does not import
torchmetrics (most of that import's time): only importing this module loads it.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric


class RankClassificationAccuracy(Metric):
    """Accuracy of rank classification: the predicted choice is the one with the highest
    length-normalized log-likelihood ``β`` (T-Few §3.2). ``update(scores (B, C), correct (B,))``."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    hits: torch.Tensor  # metric states: tensors torchmetrics reduces across processes
    total: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("hits", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, correct: torch.Tensor) -> None:
        if scores.dim() != 2 or correct.shape != scores.shape[:1]:
            raise ValueError(
                f"scores must be (B, C) and correct (B,), got {tuple(scores.shape)} and "
                f"{tuple(correct.shape)}"
            )
        self.hits += (scores.argmax(-1) == correct).sum()
        self.total += correct.numel()

    def compute(self) -> torch.Tensor:
        return self.hits.float() / self.total.clamp(min=1)
