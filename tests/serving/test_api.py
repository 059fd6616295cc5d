"""AdapterAPI's batch handling in process: LitServe hands it a batch of decoded items, it
answers each one alone (refusals, admin items in arrival order, a failing row)."""

from __future__ import annotations

import json

import pytest

from tests.serving.adapters_on_disk import prompts, reference

pytest.importorskip("litserve")

from lightning_peft.serving import AdapterAPI


@pytest.fixture
def api(folders):
    api = AdapterAPI(
        folders / "base",
        {"a": folders / "a", "b": folders / "b"},
        max_new_tokens=8,
        adapter_root=folders,
    )
    api.setup("cpu")
    return api


def answers(api: AdapterAPI, bodies: list[dict]) -> list[tuple[int, dict]]:
    """``(status, body)`` of each request of one batch, as LitServe would send them."""
    out = []
    for response in map(api.encode_response, api.predict([api.decode_request(b) for b in bodies])):
        if isinstance(response, dict):
            out.append((200, response))
        else:
            out.append((response.status_code, json.loads(response.body)))
    return out


def test_a_row_that_fails_inside_the_model_gets_a_500_and_its_batch_is_served(api, folders):
    generate = api.engine._run

    def fails_on_token_13(jobs):  # a fault injected into one row's generation
        if any(13 in job.input_ids for job in jobs):
            raise RuntimeError("the kernel ran out of memory")
        return generate(jobs)

    api.engine._run = fails_on_token_13
    ids = prompts(3, seed=9)
    bodies = [
        {"adapter": "a", "input_ids": ids[0]},
        {"adapter": "b", "input_ids": [13, 14]},
        {"adapter": None, "input_ids": ids[1]},
        {"adapter": "nope", "input_ids": ids[2]},
    ]
    (ok_a, failed, ok_base, unknown) = answers(api, bodies)
    assert ok_a == (
        200,
        {"adapter": "a", "text": None, "output_ids": reference(folders, "a", ids[0], 8)},
    )
    assert failed == (
        500,
        {"detail": "the model failed: RuntimeError: the kernel ran out of memory"},
    )
    assert ok_base[0] == 200 and ok_base[1]["output_ids"] == reference(folders, None, ids[1], 8)
    assert unknown[0] == 404


def test_admin_items_act_in_arrival_order_within_a_batch(api, folders):
    admin = {"_lightning_peft_admin": api.admin_key}
    bodies = [
        {"adapter": "a", "input_ids": [5, 6]},
        {**admin, "op": "delete", "name": "a"},
        {"adapter": "a", "input_ids": [5, 6]},
        {**admin, "op": "load", "name": "a", "path": str(folders / "c")},
        {"adapter": "a", "input_ids": [5, 6]},
        {"_lightning_peft_admin": "guessed", "op": "delete", "name": "b"},
    ]
    first, deleted, gone, loaded, again, forged = answers(api, bodies)
    assert first[1]["output_ids"] == reference(folders, "a", [5, 6], 8)
    assert deleted == (200, {"deleted": "a"})
    assert gone == (404, {"detail": "no adapter named 'a'; loaded: ['b']"})
    assert loaded[0] == 200 and loaded[1]["method"] == "IA3"
    # Decoded before the batch ran, the request meets the adapter loaded just before it.
    assert again[1]["output_ids"] == reference(folders, "c", [5, 6], 8)
    assert forged[0] == 400 and "unknown field(s)" in forged[1]["detail"]
    assert [a["name"] for a in api.engine.adapters()] == ["b", "a"]


def test_a_request_after_a_load_in_the_same_batch_is_served_by_it(api, folders):
    admin = {"_lightning_peft_admin": api.admin_key}
    bodies = [
        {**admin, "op": "load", "name": "fresh", "path": str(folders / "d")},
        {"adapter": "fresh", "input_ids": [5, 6], "choices": [[7], [8]]},
        {"adapter": "fresh", "input_ids": [5, 6]},
    ]
    (loaded, scored, generated) = answers(api, bodies)
    assert loaded[0] == scored[0] == generated[0] == 200
    assert generated[1]["output_ids"] == reference(folders, "d", [5, 6], 8)


def test_a_prompt_the_tokenizer_cannot_encode_is_refused_alone(folders, tmp_path):
    from transformers import AutoTokenizer

    vocab = {chr(97 + i): i for i in range(26)} | {"[UNK]": 26}
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(
        tmp_path / "base"
    )
    import shutil

    for file in (folders / "base").iterdir():
        shutil.copy(file, tmp_path / "base")
    assert AutoTokenizer.from_pretrained(tmp_path / "base")("ab")["input_ids"] == [0, 1]
    api = AdapterAPI(tmp_path / "base", {"a": folders / "a"}, max_new_tokens=8)
    api.setup("cpu")
    bad, good = answers(
        api, [{"adapter": "a", "prompt": "x\ud800y"}, {"adapter": "a", "prompt": "abc"}]
    )
    assert bad[0] == 400 and bad[1]["detail"].startswith('"prompt" cannot be tokenized: ')
    assert good[0] == 200 and good[1]["output_ids"] == reference(folders, "a", [0, 1, 2], 8)
    assert isinstance(good[1]["text"], str)


def test_the_servers_timeout_is_each_generations_deadline(api):
    """LitServe answers 504 to a request past its timeout; the worker stops its rows then."""
    import time

    body = {"adapter": "a", "input_ids": prompts(1)[0], "max_new_tokens": 8}
    assert api.decode_request(body).deadline is None  # no --timeout: no deadline
    api.request_timeout = 30.0
    before = time.monotonic()
    assert before + 30 <= api.decode_request(body).deadline <= time.monotonic() + 30
    admin = {"_lightning_peft_admin": api.admin_key, "op": "complete", "request": body}
    admin.update(detail=True, ticket="0" * 32)
    arrived = before - 29.9  # a request that waited in the queue
    job = api.decode_request({**admin, "arrived": arrived})
    assert job.deadline == arrived + 30 and job.detail
    time.sleep(0.2)
    status, answer = answers(api, [{**admin, "arrived": arrived}])[0]
    assert status == 504 and "passed its deadline" in answer["detail"]
