"""The examples run as the README shows them, so they never rot."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_quickstart_learns_the_rule_and_survives_merging(capsys):
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    before = float(re.search(r"accuracy before: ([0-9.]+)", out).group(1))
    after = float(re.search(r"accuracy after: +([0-9.]+)", out).group(1))
    merged = float(re.search(r"accuracy merged: ([0-9.]+)", out).group(1))
    assert before < 0.1 and after > 0.9 and merged > 0.9
    assert "merged 14 layers into the NF4 base" in out
