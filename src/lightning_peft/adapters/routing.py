"""Which adapter each row of a batch goes through (mixed-task batches)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Routing:
    """``names[index[b]]`` is the adapter row ``b`` goes through.

    Attributes:
        names: the adapter names the batch uses.
        index: ``(B,)`` long tensor of positions in ``names``, one per row.
    """

    names: tuple[str | None, ...]  # None: the row takes no adapter
    index: torch.Tensor
