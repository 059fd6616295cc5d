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


def test_names_live_in_their_modules_and_unknown_ones_are_refused():
    import pytest

    import lightning_peft

    with pytest.raises(AttributeError, match="has no attribute 'adapter_parameter_names'"):
        lightning_peft.adapter_parameter_names  # noqa: B018 (lightning_peft.injection's)
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        lightning_peft.nothing  # noqa: B018


def test_every_package_error_has_one_base_and_keeps_its_builtin_one():
    import inspect

    import lightning_peft.errors as errors
    from lightning_peft.serving.requests import RequestError

    classes = [
        c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__
    ]
    assert len(classes) >= 6
    for error in [*classes, RequestError]:
        assert issubclass(error, errors.LightningPeftError), error
    # The two the top level exports catch every configuration and state error.
    assert issubclass(errors.TargetModulesError, errors.AdapterConfigError)
    assert issubclass(errors.UnsupportedLayerError, errors.AdapterConfigError)
    assert issubclass(errors.UnsupportedLayerError, TypeError)  # as before
    assert issubclass(errors.AdapterStateKeyError, KeyError)
    assert issubclass(errors.MissingAssetError, ModuleNotFoundError)


def test_the_commands_help_imports_neither_lightning_nor_transformers():
    script = (
        "import sys\n"
        "from lightning_peft.command import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0\n"
        "heavy = ('lightning', 'transformers', 'litserve')\n"
        "print(' '.join(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    lines = result.stdout.splitlines()
    assert "fit, validate, test, predict" in result.stdout
    assert lines[-1] == ""  # none of them loaded: --help answers in the package's import time


def test_every_module_imports_first_whatever_the_package_imports_before_it():
    """The layers hold by what each module imports, not by the order of
    lightning_peft/__init__.py: each module is imported first, in a package whose __init__
    imports nothing (one process; the package's modules are forgotten between imports)."""
    from pathlib import Path

    root = Path(__file__).parents[1] / "src" / "lightning_peft"
    names = sorted(
        ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        for path in root.rglob("*.py")
    )
    script = f"""
import importlib, sys, types
failed = []
for name in {names!r}:
    for loaded in [m for m in sys.modules if m.split(".")[0] == "lightning_peft"]:
        del sys.modules[loaded]
    package = types.ModuleType("lightning_peft")
    package.__path__ = [{str(root)!r}]
    sys.modules["lightning_peft"] = package
    try:
        importlib.import_module(name)
    except Exception as error:
        failed.append(f"{{name}}: {{type(error).__name__}}: {{error}}")
print("\\n".join(failed) or "all imported")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "all imported", result.stdout
    assert len(names) > 60
