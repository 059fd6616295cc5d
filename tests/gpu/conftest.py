"""The CUDA lane (``make test-gpu``): tests marked ``cuda`` run on the first GPU and are
skipped, saying so, without one. The normal suite collects them, so they cannot rot unseen.

``LIGHTNING_PEFT_GPU_LANE_ON_CPU=1`` runs the lane's tests that do not need CUDA itself on
the CPU instead (a check of the tests, not of CUDA): what they compare holds on both.
"""

from __future__ import annotations

import os

import pytest
import torch

ON_CPU = os.environ.get("LIGHTNING_PEFT_GPU_LANE_ON_CPU") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    for item in items:
        if "cuda" not in item.keywords:
            continue
        if ON_CPU and "cuda_only" not in item.keywords:
            continue
        item.add_marker(pytest.mark.skip(reason="needs CUDA: `make test-gpu` on a GPU machine"))


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
