"""A server you can put on a network: every route but /health needs the API key, the
adapter routes their own key or nothing at all, adapters load only from the adapter root
(refused alike whether or not something exists outside it), and SIGTERM leaves no process
and a free port."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.serving.adapters_on_disk import call, free_port, prompts, serving
from tests.tiny_models import tiny_llama

KEY = "k" * 24
SERVE = [sys.executable, "-m", "lightning_peft.command", "serve"]
ADMIN = "a" * 24


@pytest.fixture(scope="module")
def guarded(folders, tmp_path_factory):
    files = tmp_path_factory.mktemp("keys")
    (files / "admin").write_text(ADMIN + "\n")
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(folders / "a", root / "a")  # an adapter under the root
    (root / "outside").symlink_to(folders)  # a link leading out of it: refused like ../
    arguments = ["--base", str(folders / "base"), "--adapter", f"b={folders / 'b'}"]
    arguments += ["--adapter-root", str(root), "--admin-key-file", str(files / "admin")]
    with serving(arguments, env={"LIGHTNING_PEFT_API_KEY": KEY}) as url:
        yield url


def test_every_route_but_health_needs_the_key(guarded):
    body = {"adapter": "b", "input_ids": prompts(1)[0]}
    routes = [("/predict", "POST", body), ("/info", "GET", None), ("/", "GET", None)]
    routes += [("/docs", "GET", None), ("/openapi.json", "GET", None), ("/v1/models", "GET", None)]
    for route, method, sent in routes:
        for key in (None, "wrong" * 5):
            status, answer = call(guarded + route, method, sent, key=key)
            assert status == 401, (route, answer)
    assert call(guarded + "/predict", "POST", body, key=KEY)[0] == 200
    # Refused before the body is read: a malformed body without the key is a 401, not a 400.
    assert call(guarded + "/predict", "POST", raw=b'{"adapter": [[[')[0] == 401


def test_adapter_routes_need_the_admin_key(guarded):
    assert call(guarded + "/adapters")[0] == 401
    assert call(guarded + "/adapters", key=KEY)[0] == 401  # the API key is not enough
    status, listed = call(guarded + "/adapters", key=ADMIN)
    assert status == 200 and [a["name"] for a in listed["adapters"]] == ["b"]
    assert call(guarded + "/adapters/b", "DELETE", key=KEY)[0] == 401


def test_adapters_load_by_name_from_the_root_and_nothing_outside_it_is_told(guarded):
    status, loaded = call(guarded + "/adapters", "POST", {"name": "a"}, key=ADMIN)
    assert status == 200 and loaded["name"] == "a"
    refusals = [
        call(guarded + "/adapters", "POST", {"name": "x", "path": path}, key=ADMIN)
        for path in ("../a", "outside/a", "no-such-adapter", "../../../etc", "outside", "x" * 5000)
    ]
    assert {status for status, _ in refusals} == {404}
    # The same words for every path, whatever exists there: only the path given is echoed.
    paths = ("../a", "outside/a", "no-such-adapter", "../../../etc", "outside", "x" * 5000)
    details = {
        answer["detail"].replace(repr(path) if len(path) < 60 else f"{repr(path)[:57]}...", "PATH")
        for path, (_, answer) in zip(paths, refusals, strict=True)
    }
    assert details == {"no adapter PATH under this server's adapter root"}
    absolute = call(guarded + "/adapters", "POST", {"name": "x", "path": "/etc"}, key=ADMIN)
    assert absolute[0] == 400 and "relative to the server's adapter root" in absolute[1]["detail"]
    assert call(guarded + "/adapters/a", "DELETE", key=ADMIN) == (200, {"deleted": "a"})


def test_without_admin_routes_there_is_nothing_to_load_or_unload(folders):
    arguments = ["--base", str(folders / "base"), "--adapter", f"b={folders / 'b'}", "--no-admin"]
    with serving(arguments) as url:
        assert call(url + "/adapters")[0] == 404
        assert call(url + "/adapters/b", "DELETE")[0] == 404
        assert call(url + "/predict", "POST", {"adapter": "b", "input_ids": [5, 6]})[0] == 200


def test_a_client_that_leaves_has_its_generation_stopped(tmp_path):
    base = tiny_llama(init_std=0.3)
    base.generation_config.eos_token_id = None  # nothing ends its answers early
    base.save_pretrained(tmp_path / "base")
    requests = {
        "/predict": {"adapter": None, "input_ids": [5, 6, 7], "max_new_tokens": 2000},
        "/v1/completions": {
            "model": "base",
            "prompt": [5, 6, 7],
            "max_tokens": 2000,
            "temperature": 0,
        },
    }
    with serving(["--base", str(tmp_path / "base"), "--max-new-tokens", "2000"]) as url:
        for left, (route, request) in enumerate(requests.items(), start=1):
            # 2000 tokens take tens of seconds here; the client leaves after one.
            body = json.dumps(request).encode()
            head = f"POST {route} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            head += f"Content-Length: {len(body)}\r\n\r\n"
            with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as client:
                client.sendall(head.encode() + body)
                time.sleep(1.0)
            deadline = time.monotonic() + 20
            while call(url + "/adapters")[1]["served"]["gone"] < left:
                assert time.monotonic() < deadline, f"{route}: went on without its client"
                time.sleep(0.2)
            served = call(url + "/adapters")[1]["served"]
            # One pass a request: the one stopped, and each earlier round's answered one.
            assert served["gone"] == left and served["passes"] == 2 * left - 1, (route, served)
            assert call(url + "/predict", "POST", {"adapter": None, "input_ids": [5]})[0] == 200


def test_a_network_address_without_a_key_is_refused_before_loading(folders):
    environment = {k: v for k, v in os.environ.items() if k != "LIGHTNING_PEFT_API_KEY"}
    code, errors = refused(
        [*SERVE, "--base", str(folders / "base"), "--host", "0.0.0.0"], environment
    )
    assert code == 2
    assert "--host 0.0.0.0 serves the network: give an API key" in errors


@pytest.mark.parametrize("key", ["   ", "short"])
def test_a_blank_or_short_key_is_refused_not_taken_as_no_key(folders, key):
    environment = {**os.environ, "LIGHTNING_PEFT_API_KEY": key}
    code, errors = refused([*SERVE, "--base", str(folders / "base")], environment)
    assert code == 2
    assert "LIGHTNING_PEFT_API_KEY: the key must be one word of at least 16" in errors


def refused(command: list[str], environment: dict[str, str]) -> tuple[int | None, str]:
    """Exit code and stderr of a server that should refuse to start; one that starts
    anyway is stopped with every process it began."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        start_new_session=True,
    )
    try:
        _, errors = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, errors = process.communicate()
    return process.returncode, errors


def test_sigterm_stops_every_process_and_frees_the_port(folders):
    port = free_port()
    process = subprocess.Popen(
        [*SERVE, "--base", str(folders / "base"), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while call_health(port) != 200:
            assert time.monotonic() < deadline and process.poll() is None, "did not start"
            time.sleep(0.3)
        assert len(session_processes(process.pid)) >= 3  # main, uvicorn, worker, ...
        process.send_signal(signal.SIGTERM)  # the main process only, as systemd or kill do
        process.wait(timeout=30)
        deadline = time.monotonic() + 15
        while session_processes(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert session_processes(process.pid) == []
        with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
            probe.connect(("127.0.0.1", port))  # nobody listens
        with socket.socket() as probe:  # and a restart can bind it, as uvicorn does
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
            probe.listen()
    finally:
        for pid in session_processes(process.pid):
            os.kill(pid, signal.SIGKILL)


def call_health(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
            return answer.status
    except OSError:
        return None


def session_processes(session: int) -> list[int]:
    """Live processes of the session the server started (its children included)."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            alive.append(int(entry))
    return alive
