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


def _fail_at_the_last_layer(monkeypatch, method: str) -> None:
    """The last adapted layer's ``merge``/``unmerge`` raises after the others have run, as a
    layer would that runs out of memory dequantizing."""
    from lightning_peft.adapters.lora import LoRALinear

    real = getattr(LoRALinear, method)
    calls = {"n": 0}

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 4:  # q, v of layer 0, q of layer 1 done; then v of layer 1
            raise RuntimeError("out of memory while dequantizing")
        return real(self)

    monkeypatch.setattr(LoRALinear, method, flaky)


def _trained_lora(model):
    apply_adapters(model, LoRA(rank=4, target_modules=["q_proj", "v_proj", "lm_head"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
    return model


@pytest.mark.parametrize("base", ["float", "nf4"])
def test_merge_refused_half_way_leaves_no_layer_merged(monkeypatch, base):
    from lightning_peft.quantization import quantize_model

    model = tiny_llama()
    if base == "nf4":
        quantize_model(model, "nf4")
    model = _trained_lora(model)
    before = model_snapshot(model)
    _fail_at_the_last_layer(monkeypatch, "merge")
    with pytest.raises(RuntimeError, match="out of memory"):
        merge_adapters(model)
    assert_model_unchanged(model, before)
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_merge_refused_half_way_ties_the_untied_head_again(monkeypatch):
    model = _trained_lora(tiny_llama(tie_word_embeddings=True))
    before = model_snapshot(model)
    _fail_at_the_last_layer(monkeypatch, "merge")
    with pytest.raises(RuntimeError, match="out of memory"):
        merge_adapters(model)  # q, v, q, then v refuses; lm_head would come last
    assert_model_unchanged(model, before)
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight


def test_unmerge_refused_half_way_leaves_every_layer_merged(monkeypatch):
    from lightning_peft import unmerge_adapters

    model = _trained_lora(tiny_llama())
    merge_adapters(model)
    before = model_snapshot(model)
    _fail_at_the_last_layer(monkeypatch, "unmerge")
    with pytest.raises(RuntimeError, match="out of memory"):
        unmerge_adapters(model)
    assert_model_unchanged(model, before)
    assert all(m.merged for m in model.modules() if hasattr(m, "merged"))


def test_a_wrap_that_rewrote_base_weights_then_raised_leaves_them_as_they_were(monkeypatch):
    """A method starting from the base weights (as PiSSA does: W <- W - B A) writes into the
    base in place; when a later layer refuses, those writes are undone, not only the wiring."""
    real = LoRA.wrap
    wrapped = []

    def rewriting_wrap(self, layer, name, target):
        with torch.no_grad():
            layer.weight.mul_(0.5)  # in place, as a residual start would
        if len(wrapped) == 2:
            raise RuntimeError("the third layer refuses")
        wrapped.append(target)
        return real(self, layer, name, target)

    monkeypatch.setattr(LoRA, "wrap", rewriting_wrap)
    model = tiny_llama()
    before = model_snapshot(model)
    with pytest.raises(RuntimeError, match="third layer"):
        apply_adapters(model, LoRA(rank=4, target_modules=["q_proj", "v_proj"]))
    assert_model_unchanged(model, before)
