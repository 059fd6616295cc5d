"""The examples run as the README shows them, so they never rot."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def run_example(name: str, capsys) -> str:
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def accuracy(label: str, out: str) -> float:
    return float(re.search(rf"{label}: +([0-9.]+)", out).group(1))


def test_quickstart_learns_the_rule_and_resumes_exactly(capsys):
    out = run_example("quickstart.py", capsys)
    assert accuracy("accuracy of the NF4 base", out) < 0.1
    assert accuracy("accuracy after", out) > 0.9
    assert "(identical)" in out


def test_plain_pytorch_example_learns_the_rule_and_survives_merging(capsys):
    out = run_example("plain_pytorch.py", capsys)
    assert accuracy("accuracy before", out) < 0.1
    assert accuracy("accuracy after", out) > 0.9 and accuracy("accuracy merged", out) > 0.9
    assert "merged 14 layers into the NF4 base" in out
