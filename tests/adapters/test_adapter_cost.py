"""What a LoRA layer adds to its base layer's forward, read from PyTorch's profiler: two
matmuls (``x A^T``, then ``B`` with the scale and the residual add on one ``addmm``), and no
cast, copy of the input, dropout, or separate multiply and add."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lightning_peft import LoRA, apply_adapters
from lightning_peft.quantization import quantize_linear

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm"}
# What an adapter path must not add: casts, elementwise scale / add, dropout, copies of x.
EXTRA = {
    "aten::to",
    "aten::_to_copy",
    "aten::mul",
    "aten::add",
    "aten::dropout",
    "aten::native_dropout",
    "aten::bernoulli_",
    "aten::clone",
    "aten::contiguous",
}


def ops(module: torch.nn.Module, x: torch.Tensor) -> Counter:
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        module(x)
    return Counter(event.name for event in prof.events())


def layer(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    return torch.nn.Sequential(linear if kind == "float" else quantize_linear(linear, "nf4"))


@pytest.mark.parametrize("kind", ["float", "nf4"])
@pytest.mark.parametrize(("training", "dropout"), [(True, 0.0), (False, 0.1)])
def test_lora_adds_two_matmuls_and_nothing_else(kind, training, dropout):
    x = torch.randn(2, 8, 64)
    base = layer(kind)
    adapted = apply_adapters(layer(kind), LoRA(rank=4, dropout=dropout, target_modules=["0"]))
    adapted.train(training)
    extra = ops(adapted, x) - ops(base, x)
    assert sum(extra[name] for name in MATMULS) == 2, extra
    assert extra["aten::addmm"] == 1, extra  # B's matmul carries the scale and the residual
    assert not {name for name in extra if name in EXTRA}, extra
