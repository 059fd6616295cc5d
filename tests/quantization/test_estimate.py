"""estimate_memory against the QLoRA paper's figures for a 70B model."""

from __future__ import annotations

import pytest

from lightning_peft.quantization.estimate import NF4_CONSTANT_BITS, estimate_memory


@pytest.mark.parametrize(
    ("method", "published_gb", "tolerance"),
    [("full", 840, 0.01), ("lora", 154, 0.03), ("qlora", 46, 0.02)],
)
def test_70b_matches_the_published_figures(method, published_gb, tolerance):
    estimate = estimate_memory(70e9, method)
    assert estimate.total_bytes / 1e9 == pytest.approx(published_gb, rel=tolerance)


def test_bits_per_parameter_and_constants():
    assert NF4_CONSTANT_BITS == pytest.approx(0.127, abs=5e-4)
    assert estimate_memory(7e9, "full").bits_per_parameter() == pytest.approx(96)
    qlora = estimate_memory(7e9, "qlora")
    assert 5.0 < qlora.bits_per_parameter() < 5.6
    assert qlora.fits(48) and not estimate_memory(7e9, "full").fits(48)
    table = estimate_memory(70e9, "qlora").table(gpu_gb=48)
    assert "| quantization constants | 1.1 |" in table and "fits in 48 GB" in table


def test_bad_arguments_are_listed():
    with pytest.raises(
        ValueError, match=r"method must be one of .*got 'qlora4'; optimizer must be one of"
    ):
        estimate_memory(1e9, "qlora4", optimizer="lion")
