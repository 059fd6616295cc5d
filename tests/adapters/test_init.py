"""Same seed, same initial adapters: whichever way they are attached, whatever drew before."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_peft import (
    BottleneckAdapter,
    LoRA,
    PeftCallback,
    PrefixTuning,
    PromptTuning,
    adapter_state_dict,
    apply_adapters,
)
from tests.lightning_modules import CausalLM, fit
from tests.tiny_models import tiny_llama

METHODS = {
    "lora": LoRA(rank=4, target_modules="all-linear"),
    "lora-gaussian": LoRA(rank=4, target_modules=["q_proj"], init="gaussian"),
    "bottleneck": BottleneckAdapter(),
    "prompt": PromptTuning(num_virtual_tokens=4),
    "prefix": PrefixTuning(num_virtual_tokens=4),
}


def initial(config, seed: int = 123, draws_before: int = 0) -> dict[str, torch.Tensor]:
    model = tiny_llama()
    L.seed_everything(seed, verbose=False)
    torch.rand(draws_before)  # whatever else used the global RNG in between
    return adapter_state_dict(apply_adapters(model, config))


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("method", METHODS)
def test_initial_values_depend_on_the_seed_not_on_earlier_draws(method):
    config = METHODS[method]
    assert_equal(initial(config), initial(config, draws_before=7))
    other = initial(config, seed=124)
    assert any(not torch.equal(v, other[k]) for k, v in initial(config).items())


def test_each_layer_and_each_adapter_name_gets_its_own_values():
    model = tiny_llama()
    L.seed_everything(123, verbose=False)
    apply_adapters(model, LoRA(rank=4, target_modules=["q_proj", "v_proj"]))
    apply_adapters(model, LoRA(rank=4, target_modules=["q_proj"]), name="second")
    layer = model.model.layers[0].self_attn
    first, second = layer.q_proj.lora_A["default"].weight, layer.q_proj.lora_A["second"].weight
    other_layer = model.model.layers[1].self_attn.q_proj.lora_A["default"].weight
    assert not torch.equal(first, second) and not torch.equal(first, other_layer)


def test_the_callback_on_a_lightning_module_starts_where_apply_adapters_on_the_model_does(
    tmp_path,
):
    """Names inside the LightningModule (``model.model.layers...``) and inside the bare
    transformers model (``model.layers...``) name the same layers: the same values."""
    config = LoRA(rank=4, target_modules="all-linear")
    module = CausalLM()
    fit(module, tmp_path, 0, [PeftCallback(config)])  # fit seeds 123 and attaches, no step
    through_lightning = {k.removeprefix("model."): v for k, v in adapter_state_dict(module).items()}
    assert_equal(through_lightning, initial(config))
