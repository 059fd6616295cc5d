"""Named adapters on one model: switching, disabling, deleting, and mixed-task batches."""

from __future__ import annotations

import pytest
import torch

from lightning_peft import (
    IA3,
    AdapterStateError,
    BitFit,
    LoRA,
    adapter_names,
    adapter_state_dict,
    apply_adapters,
    delete_adapter,
    disable_adapters,
    mixed_batch,
    set_active_adapters,
)
from lightning_peft.errors import TargetModulesError
from lightning_peft.injection import adapter_parameter_names
from tests.snapshots import refused_without_a_trace
from tests.tiny_models import VOCAB, tiny_llama
from tests.tolerances import reordering_tolerance

CONFIGS = {
    "lora": (
        LoRA(rank=4, target_modules=["q_proj", "v_proj"]),
        LoRA(rank=2, target_modules=["v_proj", "down_proj"]),
    ),
    "ia3": (IA3(), IA3(target_modules=["k_proj", "up_proj"], feedforward_modules=["up_proj"])),
}


def two_adapters(method: str) -> torch.nn.Module:
    """A tiny Llama with adapters "a" and "b" (different layers, ranks) moved off their init."""
    model = tiny_llama(init_std=0.3)
    first, second = CONFIGS[method]
    apply_adapters(model, first, name="a")
    apply_adapters(model, second, name="b")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in adapter_parameter_names(model):
            param = model.get_parameter(name)
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model


def only(method: str, name: str, source: torch.nn.Module) -> torch.nn.Module:
    """A fresh model carrying just adapter ``name``, with ``source``'s tensors for it."""
    model = tiny_llama(init_std=0.3)
    apply_adapters(model, CONFIGS[method]["ab".index(name)], name=name)
    state = {k: v for k, v in adapter_state_dict(source).items() if f".{name}" in k}
    model.load_state_dict(state, strict=False)
    assert set(state) == set(adapter_parameter_names(model))
    return model


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("method", CONFIGS)
def test_each_named_adapter_alone_and_the_base_are_one_switch_away(method, tokens):
    model = two_adapters(method)
    assert adapter_names(model) == ["a", "b"]
    with torch.no_grad():
        for name in "ab":
            set_active_adapters(model, name)
            torch.testing.assert_close(
                model(input_ids=tokens).logits, only(method, name, model)(input_ids=tokens).logits
            )
        with disable_adapters(model):
            torch.testing.assert_close(
                model(input_ids=tokens).logits, tiny_llama(init_std=0.3)(input_ids=tokens).logits
            )
        set_active_adapters(model, ["a", "b"])
        both = model(input_ids=tokens).logits
        assert not torch.allclose(both, only(method, "a", model)(input_ids=tokens).logits)


@pytest.mark.parametrize("method", CONFIGS)
def test_inactive_adapters_are_frozen_and_reactivated_ones_train(method):
    model = two_adapters(method)
    set_active_adapters(model, "a")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".a." in f"{n}." for n in trainable)
    assert all(".b." in f"{n}." for n in set(adapter_parameter_names(model)) - trainable)
    set_active_adapters(model, ["a", "b"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(
        adapter_parameter_names(model)
    )


@pytest.mark.parametrize("method", CONFIGS)
def test_deleting_adapters_leaves_the_others_and_finally_the_plain_base(method, tokens):
    model = two_adapters(method)
    reference = only(method, "b", model)
    delete_adapter(model, "a")
    assert adapter_names(model) == ["b"]
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=tokens).logits, reference(input_ids=tokens).logits
        )
    delete_adapter(model, "b")
    assert (
        adapter_names(model) == []
        and type(model.model.layers[0].self_attn.v_proj) is torch.nn.Linear
    )
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=tokens).logits, tiny_llama(init_std=0.3)(input_ids=tokens).logits
        )


@pytest.mark.parametrize("method", CONFIGS)
def test_a_mixed_batch_gives_each_row_its_own_adapters_output_and_gradient(method, tokens):
    model = two_adapters(method)
    params = [model.get_parameter(n) for n in adapter_parameter_names(model)]
    rows = ["a", "b", "b", "a"]
    with mixed_batch(model, rows):
        mixed = model(input_ids=tokens, labels=tokens)
    for i, name in enumerate(rows):
        with torch.no_grad():
            alone = only(method, name, model)(input_ids=tokens[i : i + 1]).logits
        torch.testing.assert_close(
            mixed.logits[i : i + 1], alone, **reordering_tolerance(alone, depth=2, width=64)
        )

    # The same gradients as two separate batches, one per adapter (equal halves: the
    # mixed mean loss is the mean of the two batches' losses).
    routed = torch.autograd.grad(mixed.loss, params)
    set_active_adapters(model, "a")
    loss_a = model(input_ids=tokens[[0, 3]], labels=tokens[[0, 3]]).loss
    set_active_adapters(model, "b")
    loss_b = model(input_ids=tokens[[1, 2]], labels=tokens[[1, 2]]).loss
    set_active_adapters(model, ["a", "b"])  # an inactive adapter is frozen
    separate = torch.autograd.grad((loss_a + loss_b) / 2, params, allow_unused=True)
    for name, r, s in zip(adapter_parameter_names(model), routed, separate, strict=True):
        assert s is not None, name
        torch.testing.assert_close(r, s, **reordering_tolerance(s, depth=2, width=64))


@pytest.mark.parametrize("method", CONFIGS)
def test_a_row_routed_to_none_gets_the_base_models_output(method, tokens):
    model = two_adapters(method)
    with torch.no_grad(), mixed_batch(model, [None, "a", None, "b"]):
        routed = model(input_ids=tokens).logits
    base = tiny_llama(init_std=0.3)
    with torch.no_grad():
        expected = base(input_ids=tokens).logits
        torch.testing.assert_close(routed[[0, 2]], expected[[0, 2]])
        assert not torch.allclose(routed[[1, 3]], expected[[1, 3]])


def test_rows_routed_by_index_tensor_and_bad_routes_refused(tokens):
    model = two_adapters("lora")
    with torch.no_grad(), mixed_batch(model, torch.tensor([1, 1, 0, 0]), names=["a", "b"]):
        by_index = model(input_ids=tokens).logits
    with torch.no_grad(), mixed_batch(model, ["b", "b", "a", "a"]):
        torch.testing.assert_close(model(input_ids=tokens).logits, by_index)
    with refused_without_a_trace(
        model,
        AdapterStateError,
        match=r"no adapter named \['c'\] in the model; it has \['a', 'b'\]",
    ):
        with mixed_batch(model, ["a", "c"]):
            pass
    with refused_without_a_trace(
        model, AdapterStateError, match=r"row indices must lie in \[0, 2\), got \[0, 2\]"
    ):
        with mixed_batch(model, torch.tensor([0, 2]), names=["a", "b"]):
            pass
    with refused_without_a_trace(
        model, AdapterStateError, match="given 2 row adapters, the layer got a batch of 4 rows"
    ):
        with mixed_batch(model, ["a", "b"]):
            model(input_ids=tokens)


def test_a_second_name_joins_only_layers_of_the_same_method():
    model = apply_adapters(tiny_llama(), LoRA(target_modules=["q_proj"]), name="a")
    with refused_without_a_trace(
        model, TargetModulesError, match="q_proj already carries a LoRALinear; .*IA3 cannot join it"
    ):
        apply_adapters(model, IA3(target_modules=["q_proj"], feedforward_modules=[]), name="b")
    with refused_without_a_trace(
        model, TargetModulesError, match="already carries an adapter named 'a'"
    ):
        apply_adapters(model, LoRA(target_modules=["q_proj"]), name="a")


def test_disabling_refuses_methods_that_train_base_tensors():
    model = apply_adapters(tiny_llama(bias=True), BitFit())
    with refused_without_a_trace(
        model, AdapterStateError, match="BitFit and Unfreeze train the base model's own tensors"
    ):
        with disable_adapters(model):
            pass


def test_deleting_the_only_active_adapter_of_some_layers_removes_it_everywhere():
    model = tiny_llama()
    apply_adapters(model, LoRA(rank=4, target_modules=["q_proj", "v_proj"]), name="a")
    apply_adapters(model, LoRA(rank=4, target_modules=["q_proj"]), name="b")
    set_active_adapters(model, "b")  # v_proj now has no active adapter
    delete_adapter(model, "b")
    assert adapter_names(model) == ["a"]
    assert all("lora_A.b." not in n for n in adapter_parameter_names(model))


def test_an_adapter_named_like_a_tensor_does_not_confuse_the_freezing():
    model = tiny_llama()
    apply_adapters(model, LoRA(rank=4, target_modules=["q_proj"]), name="weight")
    apply_adapters(model, LoRA(rank=4, target_modules=["q_proj"]), name="default")
    set_active_adapters(model, "default")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)


def test_switching_leaves_tensors_the_user_unfroze_alone():
    model = tiny_llama()
    apply_adapters(model, LoRA(rank=4, target_modules=["q_proj"]), name="a")
    apply_adapters(model, LoRA(rank=4, target_modules=["q_proj"]), name="b")
    model.lm_head.weight.requires_grad_(True)  # a head the user trains by hand
    set_active_adapters(model, "a")
    assert model.lm_head.weight.requires_grad
