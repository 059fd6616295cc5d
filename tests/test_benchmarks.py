"""The benchmark tables in the guides (docs/) are what the saved raw numbers say (no training here:
the runs take minutes to an hour; `benchmarks/fidelity.py --replot` rewrites the tables)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"


@pytest.fixture(scope="module")
def fidelity():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import fidelity

        yield fidelity
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.parametrize("task", ["bbc", "rt"])
def test_fidelity_tables_match_their_raw_numbers_and_the_guide(fidelity, task):
    saved = json.loads((RESULTS / f"fidelity-{task}.json").read_text())
    table = fidelity.write(task, **saved)
    assert table == (RESULTS / f"fidelity-{task}.md").read_text()
    assert table.strip() in (DOCS / "benchmarks.md").read_text()
    assert len(saved["seeds"]) >= 3
    assert all(len(runs) == len(saved["seeds"]) for runs in saved["rows"].values())


def test_fidelity_table_reports_mean_and_spread(fidelity):
    runs = [{"accuracy": a, "trainable": 10, "checkpoint_bytes": 2**20} for a in (0.8, 0.9)]
    full = [{"accuracy": 0.85, "trainable": 1000, "checkpoint_bytes": 2**21}]
    none = [{"accuracy": 0.5, "trainable": 0, "checkpoint_bytes": 0}]
    table = fidelity.write(
        "bbc", {"full fine-tuning": full, "x": runs, "zero": none}, [0, 1], 120, 2
    )
    assert "seeds [0, 1]; 2 min on 2 CPU threads" in table
    assert "| full fine-tuning | 0.850 ± 0.000 | 1,000 | 100.00% | 2.00 MiB |" in table
    assert "| x | 0.850 ± 0.071 | 10 | 1.00% | 1.00 MiB |" in table
    assert "| zero | 0.500 ± 0.000 | 0 | 0.00% | - |" in table


def test_fidelity_refuses_an_unknown_method_before_training(fidelity, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["fidelity.py", "--task", "bbc", "--methods", "LoRA"])
    with pytest.raises(SystemExit):
        fidelity.main()
    error = capsys.readouterr().err
    assert "unknown --methods ['LoRA']; the bbc methods are" in error
    assert "'LoRA r=8 (q, v)'" in error


def test_distillation_table_matches_its_raw_numbers_and_the_guide():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import distillation
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    saved = json.loads((RESULTS / "distillation.json").read_text())
    table = distillation.write(**saved)
    assert table == (RESULTS / "distillation.md").read_text()
    assert table.strip() in (DOCS / "distillation.md").read_text()
    assert len(saved["seeds"]) >= 3
    assert all(len(runs) == len(saved["seeds"]) for runs in saved["rows"].values())


def test_the_loftq_error_table_in_the_qlora_guide_is_the_saved_one():
    table = (RESULTS / "loftq_error.md").read_text().strip()
    assert table in (DOCS / "qlora.md").read_text()
    assert "| 8 | 0.964 | 0.929 |" in table  # the figures the LoftQ section's text quotes


def test_the_generation_table_in_the_benchmarks_guide_is_the_saved_one():
    guide = (DOCS / "benchmarks.md").read_text()
    table = (RESULTS / "generation-cpu.md").read_text()
    assert f"<!-- generation:start -->\n{table}<!-- generation:end -->" in guide
    rows = [line.split(" | ") for line in table.splitlines() if line.count(" | ") == 5]
    ratios = {(r[0].lstrip("| "), r[1]): (r[3], r[5].rstrip(" |")) for r in rows[1:]}
    fast = [float(x.rstrip("x")) for (_, v), pair in ratios.items() if v == "ours" for x in pair]
    exact = [
        float(x.rstrip("x"))
        for (path, v), pair in ratios.items()
        if v == "ours-exact" and path.startswith("AVX512")
        for x in pair
    ]
    assert fast and max(fast) <= 1.0  # at most PEFT's latency, batch 1 and 8, each path
    assert f"costs {min(exact):.1f}-{max(exact):.1f}x where the" in guide


def test_the_hostile_serving_table_in_the_guide_is_the_saved_one():
    guide = (DOCS / "serving.md").read_text()
    table = (RESULTS / "serving-hostile-cpu.md").read_text()
    assert f"<!-- serving-hostile:start -->\n{table}<!-- serving-hostile:end -->" in guide
    ratios = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines()}
    p99, memory = (float(cell.strip(" |x")) for cell in ratios["hostile / clean"][2:4])
    assert "target: p99 within 2x, worker memory within\n1.2x" in guide
    assert p99 <= 2.0 and memory <= 1.2, (p99, memory)  # what the saved run measured


@pytest.mark.parametrize("suffix", ["", "-nf4"])
def test_serving_table_in_the_serving_guide_is_the_saved_one(suffix):
    readme = (DOCS / "serving.md").read_text()
    table = (RESULTS / f"serving-cpu{suffix}.md").read_text()
    assert f"<!-- serving{suffix}:start -->\n{table}<!-- serving{suffix}:end -->" in readme
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines()[4:]}
    mixed, per_adapter = float(rows["mixed"][4]), float(rows["per-adapter"][4])
    merged = float(rows["merged"][4])
    if suffix:
        assert f"lead is smaller, {mixed / per_adapter:.2f}x" in readme
        assert f"and {mixed / merged:.2f}x the merged servers" in readme
    else:
        assert f"{mixed / per_adapter:.2f}x the tokens per second of one adapter" in readme
        assert f"{mixed / merged:.2f}x four merged single-adapter servers" in readme
