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
    assert "torchmetrics" in loaded_after(
        "from lightning_peft.tfew_metric import RankClassificationAccuracy"
    )
    assert "lightning" in loaded_after("from lightning_peft import Distillation")


def test_the_public_surface_is_at_most_30_names_and_each_resolves():
    import lightning_peft

    assert len(lightning_peft.__all__) <= 30
    assert all(getattr(lightning_peft, name) is not None for name in lightning_peft.__all__)


def test_a_name_that_moved_still_resolves_with_a_warning_naming_its_module():
    import pytest

    import lightning_peft
    from lightning_peft.injection import adapter_parameter_names

    with pytest.warns(DeprecationWarning, match="import it from lightning_peft.injection"):
        assert lightning_peft.adapter_parameter_names is adapter_parameter_names
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        lightning_peft.nothing  # noqa: B018
