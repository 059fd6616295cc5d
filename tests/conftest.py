"""Shared fixtures; the tiny models themselves live in tiny_models.py."""

from __future__ import annotations

import pytest
import torch

from tests import cpu_paths
from tests.tiny_models import VOCAB

# Before any test builds a 4-bit layer: the layer reads the answer in its __init__.
CPU_PATH = cpu_paths.apply_from_environment()


def pytest_report_header(config: pytest.Config) -> str:
    return f"bitsandbytes AVX512-BF16 CPU path: {CPU_PATH}"


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each device bitsandbytes can run on here: the CPU always, CUDA where there is a GPU."""
    return torch.device(request.param)


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
