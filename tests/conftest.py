"""Shared fixtures; the tiny models themselves live in tiny_models.py."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each device bitsandbytes can run on here: the CPU always, CUDA where there is a GPU."""
    return torch.device(request.param)


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
