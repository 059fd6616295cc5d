"""Shared fixtures; the tiny models themselves live in tiny_models.py."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
