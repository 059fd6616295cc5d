"""What a LoRA layer adds to its base layer's forward: exactly the floating-point work of two
matmuls (``x A^T``, then ``B``; counted by torch's FlopCounterMode, whatever the ops are
named), with the scale and the residual add on one ``addmm``, and no cast, copy of the
input, dropout, or separate multiply and add (read from the profiler's op names)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

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


def flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


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
    rank, rows, (out_features, in_features) = 4, 2 * 8, (32, 64)
    extra_flops = flops(adapted, x) - flops(base, x)
    assert extra_flops == 2 * rows * rank * (in_features + out_features)  # x A^T, then B
    extra = ops(adapted, x) - ops(base, x)
    assert sum(extra[name] for name in MATMULS) == 2, extra
    assert extra["aten::addmm"] == 1, extra  # B's matmul carries the scale and the residual
    assert not {name for name in extra if name in EXTRA}, extra
