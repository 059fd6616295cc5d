"""The serving engine without HTTP: many adapters on one base, each row of a batch through
its own adapter, answers equal to ``generate`` with that adapter alone."""

from __future__ import annotations

import pytest
import torch

import lightning_peft
from lightning_peft import (
    IA3,
    AdapterCheckpoint,
    LoRA,
    PeftCallback,
    PromptTuning,
    apply_adapters,
    save_peft,
)
from lightning_peft.injection import adapter_parameter_names
from lightning_peft.serving import AdapterEngine, Job, RequestError
from lightning_peft.serving.requests import parse_predict
from tests.lightning_modules import CausalLM, counting_data, fit
from tests.serving.adapters_on_disk import CONFIGS, prompts, randomized, reference, reference_scores
from tests.tiny_models import tiny_llama
from tests.tolerances import reordering_tolerance


@pytest.mark.parametrize("mix", [True, False], ids=["mixed", "per-adapter"])
def test_a_mixed_batch_answers_each_row_as_its_adapter_alone_would(folders, mix):
    engine = AdapterEngine.from_pretrained(folders / "base", mix=mix)
    for name in CONFIGS:
        engine.load(name, folders / name)
    adapters = ["a", "b", None, "c", "d", "a", "d", None]
    jobs = [
        Job(adapter, tuple(ids), steps)
        for adapter, ids, steps in zip(adapters, prompts(8), [6, 3, 5, 8, 1, 4, 7, 2], strict=True)
    ]
    outputs = engine.run(jobs)
    for job, output in zip(jobs, outputs, strict=True):
        assert output == reference(folders, job.adapter, list(job.input_ids), job.max_new_tokens)
    assert len({tuple(o) for o in outputs}) > 4  # the adapters answer differently


@pytest.mark.parametrize("mix", [True, False], ids=["mixed", "per-adapter"])
def test_choices_are_scored_per_row_as_each_adapter_alone_would(folders, mix):
    engine = AdapterEngine.from_pretrained(folders / "base", mix=mix)
    for name in CONFIGS:
        engine.load(name, folders / name)
    adapters = ["a", None, "c", "d", "b"]
    choices = [[[7]], [[9, 10], [11]], [[12], [13], [14, 15, 16]], [[17], [18]], [[19, 20]]]
    jobs = [
        Job(adapter, tuple(ids), choices=tuple(map(tuple, options)))
        for adapter, ids, options in zip(adapters, prompts(5, seed=4), choices, strict=True)
    ]
    for job, scores in zip(jobs, engine.run(jobs), strict=True):
        expected = reference_scores(folders, job.adapter, list(job.input_ids), job.choices)
        # Rows of other lengths pad this one: the sums reorder, to rounding.
        torch.testing.assert_close(
            torch.tensor(scores), expected, **reordering_tolerance(expected, depth=4, width=256)
        )
        answer = engine.answer(job, scores)
        assert answer["choice"] == int(expected.argmax()) and answer["scores"] == scores


def test_loading_and_unloading_change_what_is_served(folders):
    engine = AdapterEngine.from_pretrained(folders / "base")
    assert engine.adapters() == []
    info = engine.load("sentiment", folders / "a")
    assert info == {
        "name": "sentiment",
        "method": "LoRA",
        "source": str(folders / "a"),
        "rank": 4,
        "alpha": 16.0,
    }
    engine.load("topic", folders / "c")
    assert [a["name"] for a in engine.adapters()] == ["sentiment", "topic"]
    with pytest.raises(RequestError, match="an adapter named 'topic' is loaded") as refused:
        engine.load("topic", folders / "b")
    assert refused.value.status == 409
    engine.unload("sentiment")
    request = parse_predict({"adapter": "sentiment", "input_ids": [5, 6]}, max_new_tokens_cap=16)
    with pytest.raises(RequestError, match=r"no adapter named 'sentiment'; loaded: \['topic'\]"):
        engine.job(request)
    ids = prompts(1)[0]
    (output,) = engine.run([Job("topic", tuple(ids), 5)])
    assert output == reference(folders, "c", ids, 5)


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (LoRA(rank=2, use_dora=True), "is a DoRA adapter; requests for different adapters"),
        (PromptTuning(num_virtual_tokens=2), "is a PromptTuning adapter"),
        (IA3(target_modules=["q_proj"]), "q_proj already carries a LoRALinear"),
    ],
    ids=["dora", "prompt", "ia3-on-a-lora-layer"],
)
def test_adapters_that_cannot_share_a_batch_are_refused_and_change_nothing(
    folders, tmp_path, config, reason
):
    save_peft(randomized(apply_adapters(tiny_llama(init_std=0.3), config), 0), tmp_path / "x")
    engine = AdapterEngine.from_pretrained(folders / "base")
    engine.load("a", folders / "a")
    names = adapter_parameter_names(engine.model)
    with pytest.raises(RequestError, match=reason) as refused:
        engine.load("x", tmp_path / "x")
    assert refused.value.status == 400
    assert adapter_parameter_names(engine.model) == names and [
        a["name"] for a in engine.adapters()
    ] == ["a"]


def test_a_task_head_trained_whole_is_refused(folders, tmp_path):
    save_peft(randomized(apply_adapters(tiny_llama(init_std=0.3), LoRA(rank=2)), 0), tmp_path / "x")
    config = tmp_path / "x" / "adapter_config.json"
    config.write_text(
        config.read_text().replace('"modules_to_save": null', '"modules_to_save": ["lm_head"]')
    )
    engine = AdapterEngine.from_pretrained(folders / "base")
    with pytest.raises(RequestError, match=r"also trains whole modules \(\['lm_head'\]\)"):
        engine.load("x", tmp_path / "x")


def test_an_adapter_of_another_base_shape_is_refused(folders, tmp_path):
    wider = apply_adapters(tiny_llama(hidden_size=32), LoRA(rank=2, target_modules=["q_proj"]))
    save_peft(wider, tmp_path / "wider")
    engine = AdapterEngine.from_pretrained(folders / "base")
    with pytest.raises(RequestError, match=r"shape") as refused:
        engine.load("wider", tmp_path / "wider")
    assert refused.value.status == 400 and engine.adapters() == []
    assert adapter_parameter_names(engine.model) == []


def test_a_missing_path_is_named(folders, tmp_path):
    engine = AdapterEngine.from_pretrained(folders / "base")
    with pytest.raises(RequestError, match=r"is neither a PEFT folder .* nor an adapter"):
        engine.load("x", tmp_path / "nothing")


@pytest.mark.parametrize("precision", [None, "nf4"])
def test_an_adapter_checkpoint_loads_under_a_new_name_on_its_base_only(tmp_path, precision):
    tiny_llama(0).save_pretrained(tmp_path / "base")
    tiny_llama(1).save_pretrained(tmp_path / "other")
    module = CausalLM()
    saver = AdapterCheckpoint(dirpath=tmp_path / "ckpt", filename="adapter", every_n_train_steps=8)
    if precision is None:
        # Saved under a name that is also a tensor's (lora_A.weight.weight): renamed right.
        adapters = PeftCallback(LoRA(rank=4, target_modules=["q_proj", "v_proj"]), name="weight")
        fit(module, tmp_path, 8, [adapters, saver], data=counting_data())
    else:
        fit(
            module,
            tmp_path,
            8,
            [saver],
            data=counting_data(),
            precision="nf4-lora",
            trainer_class=lightning_peft.Trainer,
        )
    engine = AdapterEngine.from_pretrained(tmp_path / "base", precision=precision)
    engine.load("counting", tmp_path / "ckpt" / "adapter.ckpt")
    engine.load("model", tmp_path / "ckpt" / "adapter.ckpt")  # named like a module
    ids = [17, 18, 19, 20]
    served, again = engine.run([Job("counting", tuple(ids), 6), Job("model", tuple(ids), 6)])
    assert served == again
    module.model.eval()
    with torch.no_grad():
        local = module.model.generate(
            torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    assert served == local[0, 4:].tolist()
    other = AdapterEngine.from_pretrained(tmp_path / "other", precision=precision)
    with pytest.raises(RequestError, match="was trained on another base") as refused:
        other.load("counting", tmp_path / "ckpt" / "adapter.ckpt")
    assert refused.value.status == 400 and other.adapters() == []


TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_messages_are_rendered_with_the_template_the_adapter_trained_with(tmp_path):
    import copy

    from lightning_peft.data import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    trained_with = copy.deepcopy(tokenizer)
    trained_with.chat_template = TEMPLATE
    module = CausalLM()
    module.tokenizer = trained_with  # the run's tokenizer: its template goes in the checkpoint
    save = AdapterCheckpoint(
        dirpath=tmp_path, filename="chat", every_n_train_steps=1, export_peft=True
    )
    fit(module, tmp_path / "run", 1, [PeftCallback(LoRA(rank=4, target_modules=["q_proj"])), save])
    engine = AdapterEngine(tiny_llama(0).eval(), tokenizer)
    engine.load("chat", tmp_path / "chat.ckpt")
    engine.load("folder", tmp_path / "chat-peft")  # its tokenizer files hold the template
    messages = [{"role": "user", "content": "Hello?"}]

    def ids(adapter):
        body = {"adapter": adapter, "messages": messages, "max_new_tokens": 2}
        return list(engine.job(parse_predict(body, max_new_tokens_cap=8)).input_ids)

    def rendered(template):
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    assert ids("chat") == ids("folder") == rendered(TEMPLATE)  # the adapter's own template
    assert ids(None) == rendered(None) != rendered(TEMPLATE)  # the base: the tokenizer's
    with pytest.raises(RequestError, match=r'"messages" must be a non-empty list'):
        parse_predict({"adapter": None, "messages": [{"role": "user"}]}, max_new_tokens_cap=8)


def test_a_4bit_base_serves_from_bitsandbytes_fast_layout_as_peft_would(folders):
    """On a CPU with AVX512-BF16 the served NF4 base runs from bitsandbytes' inference
    layout, as bitsandbytes' own eval-mode layers (and so PEFT) do: the same tokens; adapters
    load against the layout training saw; ``exact_4bit`` keeps that layout throughout."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from lightning_peft.quantization import cpu_inference_layout_available

    def packed(model: torch.nn.Module) -> int:
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        return sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", 0)) for m in layers)

    exact = AdapterEngine.from_pretrained(folders / "base", precision="nf4", exact_4bit=True)
    exact.load("a", folders / "a")
    assert packed(exact.model) == 0
    yours = AutoModelForCausalLM.from_pretrained(folders / "base")
    lightning_peft.quantization.quantize_model(yours, "nf4")
    assert packed(AdapterEngine(yours).model) == 0  # a model you pass in may train again
    if not cpu_inference_layout_available():
        pytest.skip("bitsandbytes' fast CPU 4-bit layout needs AVX512-BF16")
    fast = AdapterEngine.from_pretrained(folders / "base", precision="nf4")
    assert packed(fast.model) == 14
    fast.load("a", folders / "a")  # checked and attached on the standard layout, then packed
    assert packed(fast.model) == 14
    ids = [tuple(p) for p in prompts(3)]
    answers = fast.run([Job("a", row, 8) for row in ids])

    # What PEFT + bitsandbytes run: bitsandbytes' layers left to repack themselves.
    model = AutoModelForCausalLM.from_pretrained(folders / "base")
    lightning_peft.quantization.quantize_model(model, "nf4")
    lightning_peft.load_peft(model, folders / "a")
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True
    model.eval()
    for row, answer in zip(ids, answers, strict=True):
        prompt = torch.tensor([row])
        with torch.no_grad():
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=0,
            )
        expected = out[0, len(row) :].tolist()
        eos = model.generation_config.eos_token_id
        assert answer == (expected[: expected.index(eos) + 1] if eos in expected else expected)
    assert packed(model) == 14
