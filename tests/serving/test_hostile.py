"""What a hostile or careless client or file costs the server: bounded work, refusals
before work, and errors (not 200s) where the model's numbers are not finite."""

from __future__ import annotations

import copy
import dataclasses
import json
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_peft import AdapterCheckpoint, LoRA, PeftCallback, save_peft
from lightning_peft.serving import AdapterEngine, Job, RequestError
from lightning_peft.serving.requests import parse_predict
from tests.lightning_modules import CausalLM, counting_data, fit
from tests.serving.adapters_on_disk import prompts
from tests.tiny_models import tiny_llama


def test_a_choice_bomb_is_refused_before_any_work_naming_the_budget(folders):
    engine = AdapterEngine.from_pretrained(folders / "base", max_score_tokens=512)
    engine.load("a", folders / "a")
    bomb = parse_predict(
        {"adapter": "a", "input_ids": [5], "choices": [[7] * 100] * 64}, max_new_tokens_cap=8
    )
    with pytest.raises(RequestError, match=r"64 rows of 101 tokens.*at most 512 tokens") as info:
        engine.job(bomb)
    assert info.value.status == 400
    small = parse_predict(
        {"adapter": "a", "input_ids": [5], "choices": [[7] * 10] * 8}, max_new_tokens_cap=8
    )
    assert len(engine.job(small).choices) == 8  # 8 x 11 tokens fits


def test_a_batch_of_choices_is_scored_in_passes_within_the_budget(folders, monkeypatch):
    engine = AdapterEngine.from_pretrained(folders / "base")
    engine.load("a", folders / "a")
    jobs = [Job("a", tuple(ids), choices=((7,), (8, 9), (10,))) for ids in prompts(6)]
    engine.max_score_tokens = 2 * 3 * (max(len(job.input_ids) for job in jobs) + 2)
    widths = []
    forward = engine.model.forward

    def counted(*args, **kwargs):
        widths.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", counted)
    together = engine.run(jobs)
    assert all(rows * width <= engine.max_score_tokens for rows, width in widths)
    assert len(widths) >= 3
    for job, scores in zip(jobs, together, strict=True):
        assert scores == pytest.approx(engine.run([job])[0], abs=1e-4)


def test_text_far_past_the_context_is_refused_without_tokenizing(folders, monkeypatch):
    from lightning_peft.data import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    engine = AdapterEngine(tiny_llama(0).eval(), tokenizer)
    assert engine.context is not None and engine.max_token_bytes is not None
    calls = []
    monkeypatch.setattr(type(tokenizer), "__call__", lambda *a, **k: calls.append(a))
    huge = "word " * (engine.context * engine.max_token_bytes)  # ~1.3 MB here
    started = time.perf_counter()
    for body in ({"prompt": huge}, {"messages": [{"role": "user", "content": huge}]}):
        request = parse_predict({"adapter": None, **body}, max_new_tokens_cap=8)
        with pytest.raises(RequestError, match=r"bytes: more than the model's context"):
            engine.job(request)
    assert not calls and time.perf_counter() - started < 1.0


def test_a_config_whose_rank_is_not_its_weights_is_refused_before_allocating(tmp_path):
    from lightning_peft import load_peft
    from lightning_peft.errors import AdapterConfigError

    model = tiny_llama()
    save_peft(apply_adapters_copy(model, LoRA(rank=4, target_modules=["q_proj"])), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "r": 400000}))
    with pytest.raises(AdapterConfigError, match=r"r is 400000, but the weights' lora_A .* \[4\]"):
        load_peft(model, tmp_path / "a")
    assert not any("lora" in name for name, _ in model.named_modules())


def apply_adapters_copy(model, config):
    from lightning_peft import apply_adapters

    return apply_adapters(copy.deepcopy(model), config)


def test_finite_but_overflowing_values_are_refused_at_load(folders, tmp_path):
    engine = AdapterEngine.from_pretrained(folders / "base")
    bad = tmp_path / "huge"
    bad.mkdir()
    for name in ("adapter_config.json",):
        (bad / name).write_text((folders / "a" / name).read_text())
    saved = load_file(folders / "a" / "adapter_model.safetensors")
    tensors = {key: torch.full_like(value, 3e38) for key, value in saved.items()}
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(RequestError, match=r"overflows this base's activations") as info:
        engine.load("huge", bad)
    assert info.value.status == 400
    assert engine.sources == {} and not any("lora" in n for n, _ in engine.model.named_modules())


def test_a_row_whose_logits_are_not_finite_gets_an_error_the_others_their_answers(folders):
    engine = AdapterEngine.from_pretrained(folders / "base")
    engine.load("a", folders / "a")
    engine.load("b", folders / "b")
    with torch.no_grad():  # as if a value went bad after loading (the probe passed)
        for name, param in engine.model.named_parameters():
            if ".lora_B.b." in name:
                param.fill_(float("inf"))
    ids = [tuple(p) for p in prompts(3)]
    generated = engine.run([Job("a", ids[0], 3), Job("b", ids[1], 3), Job(None, ids[2], 3)])
    assert isinstance(generated[1], RuntimeError) and "adapter 'b'" in str(generated[1])
    assert all(isinstance(out, list) for out in (generated[0], generated[2]))
    scored = engine.run([Job("b", ids[0], choices=((7,),)), Job("a", ids[1], choices=((7,),))])
    assert isinstance(scored[0], RuntimeError) and isinstance(scored[1], list)


def test_rows_past_their_deadline_stop_between_steps(folders):
    engine = AdapterEngine.from_pretrained(folders / "base")
    engine.load("a", folders / "a")
    ids = [tuple(p) for p in prompts(3)]
    past = time.monotonic() - 1
    jobs = [Job("a", ids[0], 50, deadline=past), Job("a", ids[1], 5), Job(None, ids[2], 5)]
    outputs = engine.run(jobs)
    assert isinstance(outputs[0], RequestError) and outputs[0].status == 504
    for job, output in zip(jobs[1:], outputs[1:], strict=True):
        assert output == engine.run([job])[0]  # the rows that may go on are unchanged


def test_rows_whose_client_left_are_not_started_and_are_counted(folders, tmp_path):
    engine = AdapterEngine.from_pretrained(folders / "base")
    engine.load("a", folders / "a")
    ids = [tuple(p) for p in prompts(3)]
    (tmp_path / "left").touch()  # what the route leaves once the client has gone
    watched = str(tmp_path / "still-here")
    jobs = [Job("a", ids[0], 50, gone=str(tmp_path / "left")), Job("a", ids[1], 5, gone=watched)]
    jobs.append(Job(None, ids[2], 5))
    outputs = engine.run(jobs)
    assert isinstance(outputs[0], RequestError) and outputs[0].status == 499
    assert engine.served["gone"] == 1 and engine.served["rows"] == 2
    for job, output in zip(jobs[1:], outputs[1:], strict=True):
        assert output == engine.run([dataclasses.replace(job, gone=None)])[0]


def test_a_long_prompt_of_words_is_refused_from_its_first_part(monkeypatch):
    from lightning_peft.data import smollm2_tokenizer
    from lightning_peft.serving.engine import PREFIX_CHARS

    tokenizer = smollm2_tokenizer()
    engine = AdapterEngine(tiny_llama(0).eval(), tokenizer)
    assert engine.context is not None
    seen: list[int] = []
    real = type(tokenizer).__call__

    def counting(self, text, **kwargs):
        seen.append(len(text))
        return real(self, text, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    prompt = "word " * (2 * PREFIX_CHARS * engine.context)  # within the byte bound
    request = parse_predict({"adapter": None, "prompt": prompt}, max_new_tokens_cap=8)
    with pytest.raises(RequestError, match="more than the model's context") as info:
        engine.job(request)
    assert info.value.status == 400
    assert seen == [PREFIX_CHARS * engine.context]  # the rest was never tokenized


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An adapter checkpoint (LoRA r=4 on q_proj) trained on ``tiny_llama(0)``."""
    root = tmp_path_factory.mktemp("checkpoint")
    adapters = PeftCallback(LoRA(rank=4, target_modules=["q_proj"]))
    saver = AdapterCheckpoint(dirpath=root / "ckpt", filename="last", every_n_train_steps=2)
    fit(CausalLM(), root, 2, [adapters, saver], data=counting_data())
    return root / "ckpt" / "last.ckpt"


@pytest.mark.parametrize("precision", [None, "int8", "nf4"])
def test_checking_a_checkpoints_base_copies_no_tensor_of_the_base(
    checkpoint, monkeypatch, precision
):
    """The fingerprint check builds the base's module tree around the served tensors: a
    file costs its own adapter, never a second base (+970 MiB on SmolLM2 before)."""
    from lightning_peft.quantization import quantize_model

    base = tiny_llama(0).eval()
    if precision is not None:
        quantize_model(base, precision)
        with torch.no_grad():  # int8 layers keep their codes outside parameters after a pass
            base(input_ids=torch.tensor([[1, 2, 3]]))
    engine = AdapterEngine(base)
    copied = []
    for kind in (torch.Tensor, torch.nn.Parameter):
        monkeypatch.setattr(kind, "__deepcopy__", _counting(kind.__deepcopy__, copied))
    if precision is None:
        engine.load("x", checkpoint)
    else:  # trained on the float base: refused after the check, which copied nothing either
        with pytest.raises(RequestError, match="trained on another base"):
            engine.load("x", checkpoint)
    numbers = sum(p.numel() for p in tiny_llama(0).parameters())
    assert sum(copied) < numbers / 20, f"copied {sum(copied)} of {numbers} numbers"


def test_a_checkpoint_whose_rank_is_not_its_tensors_is_refused_before_allocating(
    checkpoint, tmp_path
):
    saved = torch.load(checkpoint, weights_only=True)
    for entry in saved["lightning_peft"]["adapters"]:
        entry["rank"] = 200000
    torch.save(saved, tmp_path / "claims.ckpt")
    engine = AdapterEngine(tiny_llama(0).eval())
    with pytest.raises(RequestError, match=r"says rank 200000, but its lora_A tensors have rank"):
        engine.load("x", tmp_path / "claims.ckpt")
    assert engine.sources == {}


def test_the_models_own_generation_masks_are_not_taken_for_overflow(folders):
    """-inf from min_new_tokens (or suppressed tokens) in the model's generation config is a
    mask, not a broken number: the row is answered."""
    engine = AdapterEngine.from_pretrained(folders / "base")
    engine.model.generation_config.min_new_tokens = 3
    output = engine.run([Job(None, tuple(prompts(1)[0]), 4)])[0]
    assert isinstance(output, list) and len(output) >= 3


def test_a_chat_without_max_tokens_may_run_to_the_servers_cap():
    from lightning_peft.serving.openai_routes import predict_body

    chat = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
    assert predict_body(chat, "base", True, 256)[0]["max_new_tokens"] == 256
    assert predict_body({**chat, "logprobs": False}, "base", True, 256)[0]
    completion = {"model": "base", "prompt": "hi"}
    assert predict_body(completion, "base", False, 256)[0]["max_new_tokens"] == 16


def _counting(deepcopy, copied: list[int]):
    def counting(self, memo):
        copied.append(self.numel())
        return deepcopy(self, memo)

    return counting


def test_a_row_that_finished_before_its_client_left_keeps_its_answer(tmp_path):
    from lightning_peft.serving.engine import _RowWatch

    (tmp_path / "left").touch()
    gone = str(tmp_path / "left")
    jobs = [Job(None, (1, 2), 1, gone=gone), Job(None, (1, 2), 5, gone=gone)]
    jobs += [Job(None, (1, 2), 5, gone=gone)]
    watch = _RowWatch(jobs, width=2, eos={9})
    watch.criteria(torch.tensor([[1, 2, 7], [1, 2, 7], [1, 2, 9]]), None)  # one token each
    assert watch.answer(0, [7, 0]) == [7]  # done at its own max_new_tokens
    assert watch.answer(2, [9, 0]) == [9]  # done at end-of-text
    cut = watch.answer(1, [7, 0])
    assert isinstance(cut, RequestError) and cut.status == 499  # cut short
