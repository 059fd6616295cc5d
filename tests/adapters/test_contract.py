"""One contract suite over every method: what apply_adapters, checkpoints and Lightning
promise whatever is trained. Each method runs on a tiny Llama whose layers have biases
(so BitFit has something to train)."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import lightning_peft
from lightning_peft import (
    IA3,
    AdapterCheckpoint,
    AdapterConfigError,
    AdapterStateError,
    BitFit,
    BottleneckAdapter,
    LoRA,
    PeftCallback,
    PeftPrecision,
    PrefixTuning,
    PromptTuning,
    adapter_state_dict,
    apply_adapters,
    count_parameters,
    load_adapter_state_dict,
    load_peft,
    merge_adapters,
    merge_and_export,
    save_peft,
    unmerge_adapters,
)
from lightning_peft.adapters import MergeableAdapter, fold_prefix_
from lightning_peft.adapters.inputs import cache_argument
from lightning_peft.injection import adapter_modules, adapter_parameter_names
from tests.external_method import OutputShift
from tests.lightning_modules import CausalLM, MixinLM, counting_data, fit
from tests.tiny_models import VOCAB, tiny_llama
from tests.tolerances import reordering_tolerance

METHODS = {
    "lora": LoRA(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "dora": LoRA(rank=4, target_modules=["q_proj", "v_proj"], use_dora=True),
    "ia3": IA3(),
    "prompt": PromptTuning(num_virtual_tokens=4),
    "prefix": PrefixTuning(num_virtual_tokens=3, encoder_hidden_size=32),
    "prefix-direct": PrefixTuning(num_virtual_tokens=3, reparametrize=False),
    "houlsby": BottleneckAdapter(reduction_factor=8),
    "pfeiffer": BottleneckAdapter(reduction_factor=8, placement="pfeiffer", activation="gelu"),
    "bitfit": BitFit(),
    "lora+bitfit": [LoRA(rank=4, target_modules=["q_proj"]), BitFit()],
    "external": OutputShift(),  # defined in tests/external_method.py, unknown to the package
}
VIRTUAL_TOKENS = {"prompt", "prefix", "prefix-direct"}  # outputs change by design at init

# What each method's trainable tensor names look like (nothing else may train).
TENSOR_NAMES = {
    "lora": r".*(q|v)_proj\.lora_[AB]\.default\.weight",
    "dora": r".*(q|v)_proj\.lora_([AB]\.default\.weight|magnitude\.default)",
    "ia3": r".*(k_proj|v_proj|down_proj)\.ia3_l\.default",
    "prompt": r"prompt_tuning\.prompt\.default",
    "prefix": r"prefix_tuning\.(embedding\.default|mlp\.default\.[02]\.(weight|bias))",
    "prefix-direct": r"prefix_tuning\.prefix\.default",
    "houlsby": r".*(o_proj|down_proj)\.adapter_(down|up)\.default\.(weight|bias)",
    "pfeiffer": r".*down_proj\.adapter_(down|up)\.default\.(weight|bias)",
    "bitfit": r".*_proj\.bias",
    "lora+bitfit": r".*(q_proj\.lora_[AB]\.default\.weight|_proj\.bias)",
    "external": r".*_proj\.shift\.default",
}

# Tiny Llama: hidden d=64, 2 layers, 4 heads of 16, 2 key/value heads (kv width 32), ffn 128.
LAYERS, D, KV, FFN = 2, 64, 32, 128
PAPER_COUNTS = {
    # LoRA (Hu et al. §4): r (d_in + d_out) per adapted matrix.
    "lora": LAYERS * (4 * (D + D) + 4 * (D + KV)),
    # DoRA adds one magnitude per output feature.
    "dora": LAYERS * (4 * (D + D) + 4 * (D + KV) + D + KV),
    # (IA)^3 (T-Few §3.3): L (d_k + d_v + d_ff).
    "ia3": LAYERS * (KV + KV + FFN),
    # Prompt tuning (Lester §2): n d.
    "prompt": 4 * D,
    # Prefix tuning, reparametrized (Li & Liang §4.3), in PEFT's layout: n kv + MLP(kv -> h ->
    # L·2·kv), kv the width of one layer's keys (grouped-query attention: less than d).
    "prefix": 3 * KV + (KV * 32 + 32) + (32 * LAYERS * 2 * KV + LAYERS * 2 * KV),
    "prefix-direct": 3 * LAYERS * 2 * KV,
    # Bottleneck (Houlsby §2.1): 2 m d + d + m per adapter, m = d / reduction_factor.
    "houlsby": LAYERS * 2 * (2 * 8 * D + D + 8),
    "pfeiffer": LAYERS * (2 * 8 * D + D + 8),
    # BitFit: every bias (q, k, v, o, gate, up, down).
    "bitfit": LAYERS * (D + KV + KV + D + FFN + FFN + D),
    "lora+bitfit": LAYERS * (4 * (D + D)) + LAYERS * (D + KV + KV + D + FFN + FFN + D),
    # OutputShift: one vector per linear layer's output, as many as BitFit's biases.
    "external": LAYERS * (D + KV + KV + D + FFN + FFN + D),
}
# Methods that say they have no Hugging Face PEFT file (save_peft refuses them, naming why).
NO_PEFT_FORMAT = {"houlsby", "pfeiffer", "bitfit", "lora+bitfit", "external"}


def base_model(seed: int = 0) -> torch.nn.Module:
    return tiny_llama(seed, bias=True, init_std=0.3)


def adapted(method: str, seed: int = 0) -> torch.nn.Module:
    return apply_adapters(base_model(seed), METHODS[method])


def perturb_(model: torch.nn.Module) -> None:
    """Move every adapter tensor off its initial value, as training would."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in adapter_parameter_names(model):
            param = model.get_parameter(name)
            param.add_(0.1 * torch.randn(param.shape, generator=generator))


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", sorted(set(METHODS) - VIRTUAL_TOKENS))
def test_output_equals_the_base_at_init(method, tokens):
    base = base_model()
    model = adapted(method)
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, base(input_ids=tokens).logits)


@pytest.mark.parametrize("method", sorted(VIRTUAL_TOKENS))
def test_virtual_tokens_made_from_real_tokens_equal_those_tokens_in_front(method, tokens):
    """A soft prompt set to the embeddings of tokens t (a prefix: to the base's keys and
    values for t) makes the model compute what the base computes on t + x, at x's positions."""
    base = base_model()
    model = adapted(method)
    front = torch.randint(0, VOCAB, (1, 3 if "prefix" in method else 4))
    n = front.shape[1]
    with torch.no_grad():
        if method == "prompt":
            model.prompt_tuning.prompt["default"].copy_(base.get_input_embeddings()(front)[0])
        else:
            fold_prefix_(model)
            cache = base(input_ids=front, use_cache=True).past_key_values
            blocks = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]
            flat = torch.stack(blocks).permute(3, 0, 1, 2, 4).reshape(n, -1)  # (n, L·2·kv)
            model.prefix_tuning.prefix["default"].copy_(flat)
        mask = torch.ones_like(tokens)
        got = model(input_ids=tokens, attention_mask=mask).logits
        expected = base(input_ids=torch.cat([front.expand(2, -1), tokens], 1)).logits[:, n:]
    assert got.shape == (2, 10, VOCAB)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # generate: greedy continuation equals the base's with the tokens in front.
    seen: list[set[str]] = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True
    )  # runs after the method's own hook: sees what the model's forward receives
    with torch.no_grad():
        ours = model.generate(tokens, attention_mask=mask, max_new_tokens=4, do_sample=False)
        theirs = base.generate(
            torch.cat([front.expand(2, -1), tokens], 1), max_new_tokens=4, do_sample=False
        )
    assert torch.equal(ours[:, 10:], theirs[:, 10 + n :])
    # The cache goes in under the name this transformers release takes (``cache`` from 5.24;
    # ``past_key_values`` there is deprecated), never both.
    current = cache_argument(model)
    assert seen and all(len(keys & {"cache", "past_key_values"}) <= 1 for keys in seen)
    assert not any(keys & ({"cache", "past_key_values"} - {current}) for keys in seen)


@pytest.mark.parametrize("method", METHODS)
def test_only_the_methods_tensors_train(method):
    model = adapted(method)
    names = adapter_parameter_names(model)  # as the state dict names them
    assert names and all(re.fullmatch(TENSOR_NAMES[method], n) for n in names), names
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(model.get_parameter(n)) for n in names}


@pytest.mark.parametrize("method", METHODS)
def test_trainable_parameter_count_is_the_papers(method):
    assert count_parameters(adapted(method)).trainable == PAPER_COUNTS[method]


@pytest.mark.parametrize("method", METHODS)
def test_adapter_only_state_round_trips(method, tokens, tmp_path):
    trained = adapted(method)
    perturb_(trained)
    torch.save(adapter_state_dict(trained), tmp_path / "adapters.pt")
    state = torch.load(tmp_path / "adapters.pt", weights_only=True)
    assert set(state) == set(adapter_parameter_names(trained))
    frozen = set(trained.state_dict()) - set(state)
    assert frozen and not frozen & set(state)

    fresh = adapted(method, seed=0)  # same base, freshly initialised adapters
    load_adapter_state_dict(fresh, state)
    with torch.no_grad():
        expected = trained(input_ids=tokens).logits
        assert not torch.equal(expected, base_model()(input_ids=tokens).logits)
        assert torch.equal(fresh(input_ids=tokens).logits, expected)


@pytest.mark.parametrize("method", METHODS)
def test_a_few_steps_lower_the_loss(method):
    model = adapted(method).train()
    batch = next(iter(counting_data(n=16)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(12):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("base", ["fp32", "nf4"])
@pytest.mark.parametrize("method", METHODS)
def test_lightning_resumes_exactly_from_an_adapter_checkpoint(method, base, tmp_path):
    config = METHODS[method]
    data = lambda: counting_data(n=48)  # noqa: E731 - 3 batches: checkpoint at an epoch end
    module = lambda: CausalLM(bias=True, nf4=base == "nf4")  # noqa: E731
    straight = fit(module(), tmp_path / "a", 6, [PeftCallback(config)], data=data())

    saver = AdapterCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    fit(module(), tmp_path / "b", 3, [PeftCallback(config), saver], data=data())
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    resumed = module()
    second = fit(
        resumed, tmp_path / "c", 6, [PeftCallback(config)], data=data(), ckpt_path=str(checkpoint)
    )
    assert second.losses == straight.losses[3:]
    saved = torch.load(checkpoint, weights_only=True)
    assert set(saved["state_dict"]) == set(adapter_parameter_names(resumed))
    assert [a["method"] for a in saved["lightning_peft"]["adapters"]] == [
        type(c).__name__ for c in (config if isinstance(config, list) else [config])
    ]


@pytest.mark.parametrize("method", METHODS)
def test_mixin_under_qlora_precision_resumes_exactly(method, tmp_path):
    """The mixin declares the method; PeftPrecision quantizes the base to NF4 first and
    rebuilds the optimizer as paged 8-bit AdamW."""
    data = lambda: counting_data(n=48)  # noqa: E731
    module = lambda: MixinLM(adapters=METHODS[method], bias=True)  # noqa: E731
    options = lambda: dict(  # noqa: E731
        trainer_class=lightning_peft.Trainer,
        plugins=[PeftPrecision("nf4-lora", optimizer="paged_adamw_8bit")],
    )
    straight = fit(module(), tmp_path / "a", 6, [], data=data(), **options())
    saver = AdapterCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    fit(module(), tmp_path / "b", 3, [saver], data=data(), **options())
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    resumed = module()
    second = fit(
        resumed, tmp_path / "c", 6, [], data=data(), ckpt_path=str(checkpoint), **options()
    )
    assert second.losses == straight.losses[3:]
    quantized = [m for m in resumed.modules() if type(m).__name__ == "Linear4bit"]
    assert len(quantized) == 2 * 7  # every linear layer of both blocks, under any adapter


@pytest.mark.parametrize("method", METHODS)
def test_merging_keeps_the_output_if_the_method_is_mergeable(method, tokens, tmp_path):
    model = adapted(method)
    perturb_(model)
    modules = [module for _, module in adapter_modules(model)]
    if not modules:
        pytest.skip("the method trains the base's own tensors: they are the weights already")
    if not all(isinstance(m, MergeableAdapter) for m in modules):
        with pytest.raises(AdapterConfigError, match="cannot be merged into the weights"):
            merge_and_export(model, "unused")
        return
    merge_and_export(model, tmp_path / "merged")  # from a copy: the model keeps its adapters
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
        tolerance = reordering_tolerance(expected, depth=4, width=D)
        torch.testing.assert_close(exported(input_ids=tokens).logits, expected, **tolerance)
        report = merge_adapters(model)
        merged = model(input_ids=tokens).logits
        assert report.changed == len(modules) and not torch.equal(
            merged, base_model()(input_ids=tokens).logits
        )
        # The merged weights compute the update in another order: equal to rounding.
        torch.testing.assert_close(
            merged, expected, **reordering_tolerance(expected, depth=4, width=D)
        )
        unmerge_adapters(model)
        torch.testing.assert_close(
            model(input_ids=tokens).logits,
            expected,
            **reordering_tolerance(expected, depth=4, width=D),
        )


@pytest.mark.parametrize("method", METHODS)
def test_peft_files_round_trip_or_are_refused_before_writing(method, tokens, tmp_path):
    trained = adapted(method)
    perturb_(trained)
    if method in NO_PEFT_FORMAT:
        with pytest.raises((AdapterConfigError, AdapterStateError)) as refused:
            save_peft(trained, tmp_path / "peft")
        assert re.search(
            "has no Hugging Face PEFT equivalent|a PEFT directory holds one", str(refused.value)
        )
        assert not (tmp_path / "peft").exists()
        return
    save_peft(trained, tmp_path / "peft")
    loaded = load_peft(base_model(), tmp_path / "peft")
    with torch.no_grad():
        expected = trained(input_ids=tokens).logits
        torch.testing.assert_close(loaded(input_ids=tokens).logits, expected, rtol=0, atol=0)
