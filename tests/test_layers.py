"""The import layers of pyproject.toml's [tool.importlinter] hold, and the check fails on an
upward import (core < adapters < injection < checkpoint < lightning | serving)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(source: Path, workdir: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the project's contract on the package under ``source``."""
    shutil.copy(ROOT / "pyproject.toml", workdir / "pyproject.toml")
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=workdir,
        env={"PYTHONPATH": str(source), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def copy_of_the_package(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "lightning_peft", source / "lightning_peft")
    return source


def test_the_layers_hold(copy_of_the_package, tmp_path):
    result = lint_imports(copy_of_the_package, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("importer", "line"),
    [
        ("errors.py", "from lightning_peft.injection import apply_adapters"),  # core -> injection
        ("adapters/lora.py", "from lightning_peft.quantization import quantize_model"),
        ("checkpoint/io.py", "from lightning_peft.lightning import trainer"),
        ("serving/requests.py", "def later():\n    import lightning_peft.lightning.cli\n"),
    ],
)
def test_an_upward_import_breaks_the_contract(copy_of_the_package, tmp_path, importer, line):
    module = copy_of_the_package / "lightning_peft" / importer
    module.write_text(module.read_text() + "\n" + line + "\n")
    result = lint_imports(copy_of_the_package, tmp_path)
    assert result.returncode != 0
    assert "1 broken" in result.stdout
    importer_name = "lightning_peft." + importer.removesuffix(".py").replace("/", ".")
    assert importer_name in result.stdout


def test_a_new_module_must_be_given_a_layer(copy_of_the_package, tmp_path):
    (copy_of_the_package / "lightning_peft" / "helpers.py").write_text("X = 1\n")
    result = lint_imports(copy_of_the_package, tmp_path)
    assert result.returncode != 0
    assert "lightning_peft.helpers" in result.stdout
