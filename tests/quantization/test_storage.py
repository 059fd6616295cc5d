"""One storage backend per kind of base layer: each reads its layer's weight densely, writes a
new one back in its own format and says what the stored weight takes in memory; the
quantization modes are the backends' own."""

from __future__ import annotations

from typing import get_args

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft.quantization import (
    QUANT_MODES,
    QuantMode,
    dense_weight,
    in_out_features,
    quantize_linear,
    storage_of,
    write_weight_,
)

KINDS = ["linear", "conv1d", *QUANT_MODES]
IN, OUT = 64, 32


def layer_of(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """A layer of ``kind`` and the float ``(out, in)`` weight it was made from."""
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT)
    if kind == "linear":
        return linear, linear.weight.detach().clone()
    if kind == "conv1d":
        conv = Conv1D(OUT, IN)
        with torch.no_grad():
            conv.weight.copy_(linear.weight.T)
        return conv, linear.weight.detach().clone()
    return quantize_linear(linear, kind), linear.weight.detach().clone()


def rounding(kind: str, weight: torch.Tensor) -> float:
    share = {"linear": 0.0, "conv1d": 0.0, "int8": 1 / 127}.get(kind, 0.17)
    return share * weight.abs().max().item()


def test_the_modes_are_the_backends_and_the_literal_lists_them():
    assert QUANT_MODES == get_args(QuantMode) == ("nf4", "fp4", "int8")
    for mode in QUANT_MODES:
        backend = storage_of(layer_of(mode)[0])
        assert mode in backend.modes and backend.quantized


@pytest.mark.parametrize("kind", KINDS)
def test_each_backend_reads_and_writes_its_layers_weight(kind):
    layer, weight = layer_of(kind)
    backend = storage_of(layer)
    assert in_out_features(layer) == (IN, OUT)
    dense = dense_weight(layer)
    assert dense.shape == (OUT, IN) and dense.dtype == torch.float32
    # Rounding of the stored code: none for a float layer; at most half the widest gap
    # between neighbouring code values times the block's absmax for 4 bits (NF4: 1 - 0.723,
    # FP4: 1 - 0.667; double quantization rounds the absmax by under 1% more), half a step
    # of 1/127 of the row's absmax for int8, plus what the scale itself is rounded by.
    assert (dense - weight).abs().max().item() <= rounding(kind, weight)
    new = torch.randn(OUT, IN) * 0.05
    error = write_weight_(layer, new)
    assert (dense_weight(layer) - new).abs().max().item() == pytest.approx(error)
    if backend.quantized:
        assert 0 < error <= rounding(kind, new)
        assert type(layer) is (bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit)
    else:
        assert error == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_each_backend_counts_the_bytes_its_weight_takes(kind):
    layer, _ = layer_of(kind)
    nbytes = sum(t.numel() * t.element_size() for t in storage_of(layer).weight_tensors(layer))
    blocks = IN * OUT // 64
    expected = {
        "linear": IN * OUT * 4,
        "conv1d": IN * OUT * 4,
        "int8": IN * OUT + OUT * 4,  # codes, one float32 scale per row
    }.get(kind)
    if expected is None:  # 4 bits: two codes a byte, one 8-bit absmax a block with double
        # quantization, plus its 256 float32 constants per block of 256, tables and offset
        assert IN * OUT // 2 + blocks < nbytes < IN * OUT // 2 + blocks * 4 + 2 * 256 * 4 + 64
    else:
        assert nbytes == expected
