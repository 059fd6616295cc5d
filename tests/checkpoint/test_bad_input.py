"""Damaged, foreign or nonsensical adapter files are refused by name, before any change."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_peft import (
    AdapterConfigError,
    AdapterStateError,
    LoRA,
    adapter_state_dict,
    apply_adapters,
    load_adapter_state_dict,
    load_peft,
    save_peft,
)
from tests.snapshots import assert_model_unchanged, model_snapshot
from tests.tiny_models import tiny_llama

QV = LoRA(rank=4, target_modules=["q_proj", "v_proj"])


@pytest.fixture
def peft_folder(tmp_path):
    save_peft(apply_adapters(tiny_llama(), QV), tmp_path / "adapter")
    return tmp_path / "adapter"


def edit_config(folder, **fields):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa'"),
        ({"init_lora_weights": "olora"}, r"init_lora_weights='olora'"),
        ({"alora_invocation_tokens": [1, 2]}, r"alora_invocation_tokens=\[1, 2\]"),
        (
            {"lora_alpha": float("nan")},
            r"(?s)adapter_config.json: .*alpha must be a positive finite",
        ),
        ({"use_rslora": "no"}, r"(?s)adapter_config.json: .*use_rslora must be True or False"),
        ({"r": None}, r"(?s)adapter_config.json: .*rank must be a positive int, got None"),
    ],
)
def test_a_peft_config_that_would_compute_something_else_is_refused(peft_folder, fields, message):
    edit_config(peft_folder, **fields)
    model = tiny_llama()
    before = model_snapshot(model)
    with pytest.raises(AdapterConfigError, match=message):
        load_peft(model, peft_folder)
    assert_model_unchanged(model, before)


def test_a_malformed_config_names_its_path(peft_folder):
    (peft_folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterConfigError, match=r"adapter/adapter_config.json: Expecting"):
        load_peft(tiny_llama(), peft_folder)
    (peft_folder / "adapter_config.json").write_text('{"r": 4}')  # no peft_type
    with pytest.raises(AdapterConfigError, match=r"adapter_config.json: PEFT type None"):
        load_peft(tiny_llama(), peft_folder)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda t: t.fill_(float("nan")), r"holds 256 NaN or infinite values"),
        (lambda t: t.to(torch.int64), r"is torch.int64, not a floating-point tensor"),
        (lambda t: t > 0, r"is torch.bool, not a floating-point tensor"),
    ],
    ids=["nan", "int", "bool"],
)
def test_non_finite_or_non_float_adapter_tensors_are_refused(peft_folder, damage, message):
    path = peft_folder / "adapter_model.safetensors"
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key] = damage(tensors[key].clone())
    save_file(tensors, path)
    model = tiny_llama()
    before = model_snapshot(model)
    with pytest.raises(AdapterStateError, match=message):
        load_peft(model, peft_folder)
    assert_model_unchanged(model, before)

    attached = apply_adapters(tiny_llama(), QV)
    state = adapter_state_dict(attached)
    first = next(iter(state))
    state[first] = damage(state[first].clone())
    before = model_snapshot(attached)
    with pytest.raises(AdapterStateError, match=message.replace("256", r"\d+")):
        load_adapter_state_dict(attached, state)
    assert_model_unchanged(attached, before)


def test_a_pickle_only_peft_folder_is_refused_saying_why(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=r"adapter_model.bin, a pickle.*safetensors only"):
        load_peft(tiny_llama(), folder)


def test_a_backtracking_target_pattern_in_a_peft_folder_costs_no_time(tmp_path):
    """A folder's config is untrusted: its regular expression is never run; the weights
    say which modules the adapter holds (a process of its own, so a hang is a timeout)."""
    import subprocess
    import sys

    from lightning_peft import LoRA, apply_adapters, save_peft
    from tests.tiny_models import tiny_llama

    model = apply_adapters(tiny_llama(), LoRA(rank=4, target_modules=["q_proj", "v_proj"]))
    save_peft(model, tmp_path / "adapter")
    config = tmp_path / "adapter" / "adapter_config.json"
    fields = json.loads(config.read_text())
    fields["target_modules"] = "^([a-z_.0-9]+)+X$"  # catastrophic backtracking on any name
    config.write_text(json.dumps(fields))
    script = (
        "from lightning_peft import load_peft\n"
        "from lightning_peft.injection import adapter_parameter_names\n"
        "from tests.tiny_models import tiny_llama\n"
        f"model = load_peft(tiny_llama(), {str(tmp_path / 'adapter')!r})\n"
        "print(len(adapter_parameter_names(model)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.split()[-1] == "8"  # q_proj and v_proj of both layers, A and B
