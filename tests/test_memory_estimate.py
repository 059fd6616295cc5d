"""The memory estimate's activations against what a QLoRA training step really adds (peak
resident memory of a process of its own, tests/quantization/memory_probe.py), on two sizes
of Llama, one without gradient checkpointing and one with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_peft.lightning.cli import main
from lightning_peft.quantization.estimate import Architecture, estimate_memory

pytestmark = pytest.mark.slow  # two training processes

PROBE = Path(__file__).parent / "quantization" / "memory_probe.py"


@pytest.mark.parametrize(
    ("hidden", "layers", "intermediate", "vocab", "checkpointing"),
    [(256, 4, 688, 8192, False), (512, 8, 1376, 16384, True)],  # two sizes, both ways
)
def test_activations_estimated_are_what_a_step_adds(
    hidden, layers, intermediate, vocab, checkpointing
):
    sizes = ["--hidden", hidden, "--layers", layers, "--intermediate", intermediate]
    sizes += ["--vocab", vocab, "--batch", 4, "--seq-len", 256]
    flags = ["--gradient-checkpointing"] if checkpointing else []
    command = [sys.executable, str(PROBE), *map(str, sizes), *flags]
    measured = int(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    architecture = Architecture(hidden, layers, intermediate, vocab)
    estimate = estimate_memory(
        1e8,
        "qlora",
        architecture=architecture,
        batch=4,
        seq_len=256,
        gradient_checkpointing=checkpointing,
        compute_bytes=4,  # float32 on the CPU
    )
    step = sum(
        estimate.bytes[k]
        for k in ("activations", "output logits", "adapters (weights, gradients, optimizer)")
    )
    # What the estimate leaves out (matmul temporaries, allocator rounding) and the
    # adapters' share (at 1.2% of a nominal 1e8 parameters) move it by tens of percent,
    # not the 10-20x of leaving activations out.
    assert 0.6 <= measured / step <= 1.25, (measured, step)


def test_the_command_counts_activations_when_given_the_model(capsys):
    main(["memory", "135M", "--method", "qlora", "--config", "smollm2", "--batch", "8",
          "--seq-len", "256", "--compute", "fp32", "--gpu", "4"])  # fmt: skip
    table = capsys.readouterr().out
    assert "| output logits | 1.2 |" in table and "(activations included)" in table
    main(["memory", "135M", "--method", "qlora"])
    assert "activations not included: give the model's --config" in capsys.readouterr().out
