"""An operation that refuses leaves the model as it was: structure and every tensor."""

from __future__ import annotations

import pytest
import torch

from lightning_peft import (
    IA3,
    AdapterStateError,
    LoRA,
    apply_adapters,
    load_peft,
    merge_adapters,
    save_peft,
)
from tests.snapshots import assert_model_unchanged, model_snapshot
from tests.tiny_models import tiny_llama


def test_load_peft_refused_for_shapes_takes_its_adapter_away_again(tmp_path):
    source = apply_adapters(tiny_llama(), LoRA(rank=8, target_modules=["q_proj", "v_proj"]))
    save_peft(source, tmp_path / "adapter")
    model = tiny_llama()
    model.model.layers[1].self_attn.v_proj = torch.nn.Linear(64, 16, bias=False)  # other width
    before = model_snapshot(model)
    with pytest.raises(AdapterStateError, match="shapes differ"):
        load_peft(model, tmp_path / "adapter")  # attaches, then finds lora_B 32 x 8 vs 16 x 8
    assert_model_unchanged(model, before)
    assert not any("lora" in name for name, _ in model.named_modules())


def test_load_peft_refused_for_keys_takes_its_adapter_away_again(tmp_path):
    source = apply_adapters(tiny_llama(), LoRA(rank=4, target_modules=["q_proj", "v_proj"]))
    save_peft(source, tmp_path / "adapter")
    from safetensors.torch import load_file, save_file

    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors.pop(next(iter(tensors)))
    save_file(tensors, path)
    model = tiny_llama()
    before = model_snapshot(model)
    with pytest.raises(AdapterStateError, match="missing"):
        load_peft(model, tmp_path / "adapter")
    assert_model_unchanged(model, before)


def test_apply_adapters_refused_at_a_merged_layer_undoes_the_layers_before_it():
    model = apply_adapters(tiny_llama(), LoRA(rank=4, target_modules=["v_proj"]))
    merge_adapters(model)  # every v_proj now merged: a new adapter cannot join them
    before = model_snapshot(model)
    grads = [p.requires_grad for p in model.parameters()]
    with pytest.raises(AdapterStateError, match="unmerge the layer"):
        # q_proj, k_proj are wrapped first, then v_proj refuses
        apply_adapters(model, LoRA(rank=2, target_modules="all-linear"), name="second")
    assert_model_unchanged(model, before)
    assert [p.requires_grad for p in model.parameters()] == grads


def test_a_method_refused_after_another_was_attached_leaves_neither(monkeypatch):
    model = tiny_llama()
    before = model_snapshot(model)

    def refuse(self, *args, **kwargs):
        raise RuntimeError("out of memory while creating the IA3 vectors")

    monkeypatch.setattr(IA3, "wrap", refuse)
    with pytest.raises(RuntimeError, match="out of memory"):
        apply_adapters(
            model,
            [LoRA(rank=4, target_modules=["q_proj"]), IA3(target_modules=["k_proj", "down_proj"])],
        )
    assert_model_unchanged(model, before)
    assert all(p.requires_grad for p in model.parameters())
