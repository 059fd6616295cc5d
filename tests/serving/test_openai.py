"""The OpenAI-compatible routes, with the official ``openai`` client as the client: models
are the base and its adapters, greedy completions equal ``generate`` token for token, chat
applies the template, streams carry the same text, and errors are the client's exceptions."""

from __future__ import annotations

import pytest
import torch

from lightning_peft import LoRA, apply_adapters, load_peft, save_peft
from tests.serving.adapters_on_disk import randomized, serving
from tests.tiny_models import tiny_llama

openai = pytest.importorskip("openai")
KEY = "s" * 24
PROMPT = "Review: a quiet, moving film.\nSentiment:"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama with SmolLM2's tokenizer and vocabulary, and a LoRA adapter on it."""
    from lightning_peft.data import smollm2_tokenizer

    root = tmp_path_factory.mktemp("openai")
    tokenizer = smollm2_tokenizer()
    base = tiny_llama(vocab_size=len(tokenizer), init_std=0.3)
    base.generation_config.eos_token_id = tokenizer.eos_token_id
    base.save_pretrained(root / "tiny-chat")
    tokenizer.save_pretrained(root / "tiny-chat")
    adapted = randomized(apply_adapters(base, LoRA(rank=4, target_modules=["q_proj", "v_proj"])), 1)
    save_peft(adapted, root / "sent")
    return root


@pytest.fixture(scope="module")
def client(folders):
    arguments = ["--base", str(folders / "tiny-chat"), "--adapter", f"sent={folders / 'sent'}"]
    with serving(arguments, env={"LIGHTNING_PEFT_API_KEY": KEY}) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


def generated(folders, adapter: str | None, ids: list[int], steps: int) -> list[int]:
    """What plain ``generate`` continues ``ids`` with, greedily (the reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folders / "tiny-chat").eval()
    if adapter is not None:
        load_peft(model, folders / adapter)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False)
    return out[0, len(ids) :].tolist()


def tokenizer(folders):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folders / "tiny-chat")


def test_models_are_the_base_and_its_adapters(client):
    assert [model.id for model in client.models.list()] == ["tiny-chat", "sent"]


@pytest.mark.parametrize("model", ["sent", "tiny-chat"])
def test_greedy_completions_equal_generate_token_for_token(client, folders, model):
    words = tokenizer(folders)
    ids = words(PROMPT)["input_ids"]
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    expected = generated(folders, None if model == "tiny-chat" else model, ids, 8)
    assert reply.choices[0].text == words.decode(expected, skip_special_tokens=True)
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == len(expected)
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_chat_applies_the_template_and_streams_the_same_text(client, folders):
    words = tokenizer(folders)
    messages = [{"role": "user", "content": "Say something kind."}]
    ids = words.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    reply = client.chat.completions.create(
        model="sent", messages=messages, max_tokens=6, temperature=0
    )
    expected = words.decode(generated(folders, "sent", ids, 6), skip_special_tokens=True)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model="sent", messages=messages, max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens


def test_a_seed_repeats_a_sample_and_stop_cuts_the_text(client):
    def sample(seed, **options):
        return client.completions.create(
            model="sent", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed, **options
        )

    assert sample(3).choices[0].text == sample(3).choices[0].text
    whole = sample(3)
    text = whole.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = sample(3, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    # Generation ended at the stop: fewer tokens, counted as generated.
    assert cut.usage.completion_tokens < whole.usage.completion_tokens


def test_errors_are_the_clients_exceptions(client, folders):
    with pytest.raises(openai.NotFoundError, match="no adapter named 'other'"):
        client.completions.create(model="other", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.completions.create(model="sent", prompt=PROMPT, max_tokens=2, n=3)
    stranger = openai.OpenAI(base_url=str(client.base_url), api_key="x" * 24, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
