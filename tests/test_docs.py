"""docs/extending.md's code runs as written: its OutputShift attaches, trains only its
tensors, merges exactly, and checkpoints can name it."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import torch

from lightning_peft import merge_adapters
from lightning_peft.adapters import registry
from lightning_peft.checkpoint.metadata import adapter_configs, config_from_metadata
from lightning_peft.injection import adapter_parameter_names
from tests.tiny_models import VOCAB, tiny_llama

GUIDE = Path(__file__).parent.parent / "docs" / "extending.md"


def test_the_extending_guide_builds_a_working_method(monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    assert len(blocks) == 3
    # tests/external_method.py registers its own OutputShift: the guide's is another class.
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    registry._METHODS.pop("OutputShift", None)
    namespace: dict = {}
    exec(compile(blocks[0] + blocks[1], str(GUIDE), "exec"), namespace)
    model = tiny_llama(bias=True, init_std=0.3)
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(input_ids=tokens).logits
    exec(compile(blocks[2], str(GUIDE), "exec"), {**namespace, "model": model, "L": L})
    names = adapter_parameter_names(model)
    assert len(names) == 14 and all(n.endswith(".shift.default") for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(names)
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, base)  # zero at start
        for name in names:
            model.get_parameter(name).add_(0.1)
        expected = model(input_ids=tokens).logits
        assert merge_adapters(model).changed == 14
        torch.testing.assert_close(model(input_ids=tokens).logits, expected)
    (entry,) = adapter_configs(model)
    assert config_from_metadata(entry) == namespace["OutputShift"]()


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    """`make docs`: every guide, link, anchor and API reference entry resolves."""
    import subprocess
    import sys

    root = GUIDE.parents[1]
    mkdocs = Path(sys.executable).parent / "mkdocs"
    result = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=root,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reference = (tmp_path / "site" / "reference" / "index.html").read_text()
    assert "apply_adapters" in reference and "PeftCallback" in reference


def test_private_apis_guide_names_every_compat_entry():
    from lightning_peft import _compat

    text = (GUIDE.parent / "private-apis.md").read_text()
    public = [
        name
        for name, value in vars(_compat).items()
        if not name.startswith("_")
        and getattr(value, "__module__", _compat.__name__) == _compat.__name__
        and (callable(value) or name.isupper())
        and name not in {"MissingPrivateAPI"}
    ]
    missing = [name for name in public if f"`{name}`" not in text]
    assert not missing, f"docs/private-apis.md does not list {missing}"
    for _, cls, method in _compat.OVERRIDDEN:
        assert method in text, f"{cls}.{method}"
