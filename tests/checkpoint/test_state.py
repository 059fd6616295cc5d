"""Adapter state dicts: round trip, and refusals that name what does not fit."""

from __future__ import annotations

import pytest
import torch

from lightning_peft import (
    AdapterStateError,
    LoRA,
    adapter_state_dict,
    apply_adapters,
    load_adapter_state_dict,
    merge_adapters,
)
from lightning_peft.errors import AdapterStateKeyError
from tests.tiny_models import logits, tiny_llama

QV = LoRA(rank=4, target_modules=["q_proj", "v_proj"])


def trained(config: LoRA = QV) -> torch.nn.Module:
    model = apply_adapters(tiny_llama(), config)
    with torch.no_grad():
        for tensor in adapter_state_dict(model).values():
            tensor.normal_(std=0.05)
    return model


def test_round_trip_through_a_file_restores_the_outputs(tmp_path, input_ids):
    source = trained()
    torch.save(adapter_state_dict(source), tmp_path / "adapter.pt")
    target = apply_adapters(tiny_llama(), QV)
    load_adapter_state_dict(target, torch.load(tmp_path / "adapter.pt", weights_only=True))
    assert torch.equal(logits(target, input_ids), logits(source, input_ids))


def test_missing_and_unexpected_keys_are_both_listed_and_nothing_is_copied():
    target = apply_adapters(tiny_llama(), LoRA(rank=4, target_modules=["q_proj", "o_proj"]))
    before = {k: v.clone() for k, v in adapter_state_dict(target).items()}
    with pytest.raises(
        AdapterStateKeyError,
        match=r"(?s)missing from the state dict \(4\): model\.layers\.0\.self_attn\.o_proj\."
        r"lora_A.*"
        r"not adapters of this model \(4\): model\.layers\.0\.self_attn\.v_proj\.lora_A",
    ):
        load_adapter_state_dict(target, adapter_state_dict(trained()))
    assert all(torch.equal(v, before[k]) for k, v in adapter_state_dict(target).items())


def test_a_different_rank_is_refused_with_both_shapes():
    target = apply_adapters(tiny_llama(), LoRA(rank=8, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(
        AdapterStateError, match=r"lora_A\.default\.weight: checkpoint \(4, 64\), model \(8, 64\)"
    ):
        load_adapter_state_dict(target, adapter_state_dict(trained()))


def test_a_full_model_state_dict_is_refused_with_a_hint():
    target = apply_adapters(tiny_llama(), QV)
    with pytest.raises(
        KeyError, match=r"(?s)not adapters of this model \(2[0-9]\).*model\.load_state_dict"
    ):
        load_adapter_state_dict(target, trained().state_dict())


def test_loading_into_a_model_without_adapters_or_with_merged_ones_is_refused():
    with pytest.raises(
        AdapterStateError, match="has no adapters to load into; call apply_adapters first"
    ):
        load_adapter_state_dict(tiny_llama(), adapter_state_dict(trained()))
    target = trained()
    merge_adapters(target)
    with pytest.raises(
        AdapterStateError, match=r"cannot load into merged adapters .*call unmerge_adapters"
    ):
        load_adapter_state_dict(target, adapter_state_dict(trained()))
