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
