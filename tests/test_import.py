"""``import lightning_peft`` stays light: Lightning, torchmetrics and datasets load only when
a name that needs them is used."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("lightning", "torchmetrics", "datasets")


def loaded_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    return set(result.stdout.split())


def test_the_package_imports_without_lightning_torchmetrics_or_datasets():
    assert loaded_after("import lightning_peft") == set()


def test_the_lazy_names_load_what_they_need():
    assert "torchmetrics" in loaded_after("from lightning_peft import RankClassificationAccuracy")
    assert "lightning" in loaded_after("from lightning_peft import Distillation")
