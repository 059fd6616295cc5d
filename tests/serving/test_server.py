"""``lightning-peft serve`` over HTTP on loopback: concurrent clients, mixed adapters per
batch, every answer checked token for token; bad requests answered alone; adapters loaded
and unloaded without a restart."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.serving.adapters_on_disk import call, prompts, reference, reference_scores, serving
from tests.tolerances import reordering_tolerance

pytest.importorskip("litserve")


@pytest.fixture(scope="module")
def server(folders):
    """The CLI serving adapters a, b, c and d (LoRA, rsLoRA, IA3, LoRA)."""
    arguments = ["--base", str(folders / "base"), "--max-batch-size", "8"]
    arguments += ["--adapter-root", str(folders)]
    arguments += ["--batch-timeout", "0.05", "--max-new-tokens", "32"]
    with serving(arguments + [f"--adapter={n}={folders / n}" for n in "abcd"]) as url:
        yield url


def test_concurrent_clients_get_their_own_adapters_answers_in_mixed_batches(server, folders):
    before = call(server + "/adapters")[1]["served"]
    rows = [("a", "b", "c", "d", None)[i % 5] for i in range(40)]
    jobs = [
        {"adapter": adapter, "input_ids": ids, "max_new_tokens": 2 + i % 5}
        for i, (adapter, ids) in enumerate(zip(rows, prompts(40, seed=11), strict=True))
    ]
    with ThreadPoolExecutor(16) as clients:
        answers = list(clients.map(lambda job: call(server + "/predict", "POST", job), jobs))
    for job, (status, answer) in zip(jobs, answers, strict=True):
        assert status == 200, answer
        expected = reference(folders, job["adapter"], job["input_ids"], job["max_new_tokens"])
        assert answer == {"adapter": job["adapter"], "text": None, "output_ids": expected}
    served = call(server + "/adapters")[1]["served"]
    passes = served["passes"] - before["passes"]
    assert served["rows"] - before["rows"] == 40
    assert passes < 40 and served["mixed_passes"] > before["mixed_passes"], served


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"adapter": "nope", "input_ids": [5]}, 404, "no adapter named 'nope'; loaded: "),
        ({"input_ids": [5]}, 400, 'missing field "adapter"'),
        (
            {"adapter": "a"},
            400,
            'give exactly one of "prompt" (text), "messages" (a conversation) or "input_ids"',
        ),
        ({"adapter": "a", "input_ids": [5], "max_new_tokens": 0}, 400, "a positive int, got 0"),
        ({"adapter": "a", "input_ids": [5], "max_new_tokens": "8"}, 400, "positive int, got '8'"),
        ({"adapter": "a", "input_ids": [5], "max_new_tokens": 33}, 400, "is at most 32 on this"),
        ({"adapter": "a", "input_ids": [5] * 2040}, 400, "passes the model's context of 2048"),
        ({"adapter": "a", "input_ids": [999]}, 400, "lie outside the vocabulary [0, 256)"),
        ({"adapter": "a", "prompt": "hi"}, 400, "this base has no tokenizer"),
        ({"adapter": "a", "input_ids": [5], "top_k": 1}, 400, "unknown field(s)"),
        ([1, 2], 400, "the body must be a JSON object"),
        ({"adapter": "a", "input_ids": [5], "choices": []}, 400, '"choices" must be a list of'),
        ({"adapter": "a", "input_ids": [5], "choices": [[5], "x"]}, 400, "no tokenizer"),
        (
            {"adapter": "a", "input_ids": [5], "choices": [[5]], "max_new_tokens": 2},
            400,
            'give "max_new_tokens" (generate) or "choices" (score), not both',
        ),
        (b'{"adapter": "a", "input_ids": [5', 400, "the body is not JSON: "),
        # 500 levels of nesting: a 400 naming the field, not a 500 from a recursion limit.
        (b'{"adapter": "a", "prompt": ' + b"[" * 500 + b"]" * 500 + b"}", 400, "nests more than"),
        (b'{"adapter": "a", "input_ids": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, ""),
    ],
)
def test_a_bad_request_gets_a_4xx_with_its_reason_and_the_server_keeps_serving(
    server, folders, body, status, reason
):
    raw = body if isinstance(body, bytes) else None
    got, answer = call(server + "/predict", "POST", None if raw else body, raw=raw)
    assert got == status and reason in answer["detail"] and "\n" not in answer["detail"]
    ok, answer = call(server + "/predict", "POST", {"adapter": "b", "input_ids": [7, 8]})
    assert ok == 200 and answer["output_ids"] == reference(folders, "b", [7, 8], 16)


def test_a_body_larger_than_the_context_allows_is_refused_before_it_is_read(server, folders):
    import urllib.error
    import urllib.request

    from lightning_peft.serving.api import body_limit

    # 64 bytes a context token, at least 1 MiB: the tiny base's 2048 tokens get the floor.
    assert body_limit(2048) == 2**20 and body_limit(131072) == 8 * 2**20
    request = urllib.request.Request(
        server + "/predict",
        data=b'{"adapter": "a", "prompt": "' + b"x" * 2**20 + b'"}',
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413
    ok, answer = call(server + "/predict", "POST", {"adapter": "b", "input_ids": [7, 8]})
    assert ok == 200 and answer["output_ids"] == reference(folders, "b", [7, 8], 16)


def test_choices_are_scored_in_mixed_batches(server, folders):
    jobs = [
        {"adapter": adapter, "input_ids": ids, "choices": [[9], [10, 11], [12]]}
        for adapter, ids in zip(["a", "b", "c", None] * 3, prompts(12, seed=2), strict=True)
    ]
    with ThreadPoolExecutor(12) as clients:
        answers = list(clients.map(lambda job: call(server + "/predict", "POST", job), jobs))
    for job, (status, answer) in zip(jobs, answers, strict=True):
        assert status == 200, answer
        expected = reference_scores(folders, job["adapter"], job["input_ids"], job["choices"])
        torch.testing.assert_close(
            torch.tensor(answer["scores"]),
            expected,
            **reordering_tolerance(expected, depth=4, width=256),
        )
        assert answer["choice"] == int(expected.argmax()) and answer["text"] is None


def test_adapters_load_and_unload_without_a_restart(server, folders, tmp_path):
    status, listed = call(server + "/adapters")
    assert status == 200 and [a["name"] for a in listed["adapters"]] == ["a", "b", "c", "d"]
    status, loaded = call(server + "/adapters", "POST", {"name": "e", "path": "d"})
    assert status == 200 and loaded["name"] == "e" and loaded["rank"] == 8
    ids = prompts(1, seed=5)[0]
    status, answer = call(server + "/predict", "POST", {"adapter": "e", "input_ids": ids})
    assert status == 200 and answer["output_ids"] == reference(folders, "d", ids, 16)
    assert call(server + "/adapters", "POST", {"name": "e", "path": "a"}) == (
        409,
        {"detail": "an adapter named 'e' is loaded; DELETE it first"},
    )
    long = call(server + "/adapters", "POST", {"name": "y" * 65, "path": "a"})
    assert long[0] == 400 and "at most 64 characters" in long[1]["detail"]
    status, refused = call(server + "/adapters", "POST", {"name": "f", "path": "base"})
    assert status == 400 and "is neither a PEFT folder" in refused["detail"]
    status, refused = call(server + "/adapters", "POST", {"name": "f", "path": str(tmp_path)})
    assert status == 400 and "relative to the server's adapter root" in refused["detail"]
    assert call(server + "/adapters/e", "DELETE") == (200, {"deleted": "e"})
    status, gone = call(server + "/predict", "POST", {"adapter": "e", "input_ids": ids})
    assert status == 404 and "no adapter named 'e'" in gone["detail"]
    assert call(server + "/adapters/e", "DELETE")[0] == 404
    status, answer = call(server + "/predict", "POST", {"adapter": "d", "input_ids": ids})
    assert status == 200 and answer["output_ids"] == reference(folders, "d", ids, 16)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--adapter", "sentiment"], "--adapter takes NAME=PATH with NAME a Python identifier"),
        (["--adapter", "a=/no/such/folder"], "--adapter a: /no/such/folder does not exist"),
        (["--max-batch-size", "0"], "--max-batch-size must be a positive int, got 0"),
        (["--port", "80"], "--port must lie in 1024..65535, got 80"),
        (["--batch-timeout", "nan"], "--batch-timeout must be at least 0 seconds, got nan"),
        ([], "--base is needed: no PEFT adapter names its base model"),
        (["--batch-timeout", "5", "--timeout", "2"], "--timeout must be a number of seconds"),
        (["--timeout", "nan"], "--timeout must be a number of seconds above --batch-timeout"),
        (["--base", "/no/such/model"], "--base /no/such/model: no such folder"),
        (["--base", "/tmp"], "--base /tmp: the folder has no config.json"),
    ],
)
def test_bad_arguments_are_one_line_before_anything_loads(argv, message, capsys):
    from lightning_peft.serving.cli import serve

    with pytest.raises(SystemExit) as exited:
        serve(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_the_server_binds_loopback_unless_told_otherwise():
    from lightning_peft.serving.cli import parser

    assert parser().parse_args([]).host == "127.0.0.1"


def test_adapters_are_checked_from_their_files_before_the_model_loads(folders, tmp_path, capsys):
    from lightning_peft import LoRA, apply_adapters, save_peft
    from lightning_peft.serving.cli import serve
    from tests.tiny_models import tiny_llama

    save_peft(apply_adapters(tiny_llama(), LoRA(rank=2, use_dora=True)), tmp_path / "dora")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("[1, 2]")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    for adapter, message in [
        (tmp_path / "dora", "is a DoRA adapter; requests for different adapters share a batch"),
        (tmp_path / "broken", "adapter_config.json: a JSON object was expected, not list"),
        (tmp_path / "junk.ckpt", "is not an adapter checkpoint (torch.load with weights_only"),
    ]:
        with pytest.raises(SystemExit) as exited:
            serve(["--base", str(folders / "base"), f"--adapter=x={adapter}"])
        error = capsys.readouterr().err
        # argparse's usage, then the reason on one line
        assert exited.value.code == 2 and message in error.strip().splitlines()[-1]
