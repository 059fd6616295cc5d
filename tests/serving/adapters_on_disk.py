"""A tiny base and four adapters saved the way users bring them (PEFT folders), and what
plain ``generate`` answers with each: the reference every served answer must equal."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lightning_peft import IA3, LoRA, apply_adapters, load_peft, save_peft
from lightning_peft.injection import adapter_parameter_names
from tests.tiny_models import VOCAB, tiny_llama

CONFIGS = {
    "a": LoRA(rank=4, target_modules=["q_proj", "v_proj"]),
    "b": LoRA(rank=2, alpha=8, target_modules=["v_proj", "down_proj"], use_rslora=True),
    # IA3 and LoRA cannot share a layer: the IA3 adapter takes the others'.
    "c": IA3(target_modules=["k_proj", "up_proj"], feedforward_modules=["up_proj"]),
    "d": LoRA(rank=8, target_modules=["q_proj", "o_proj", "gate_proj"]),
}


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in adapter_parameter_names(model):
            param = model.get_parameter(name)
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model


def write_folders(root: Path) -> Path:
    """A saved tiny base (``root/base``) and four PEFT adapter folders trained (here:
    moved) on it, ``root/a`` .. ``root/d``."""
    tiny_llama(init_std=0.3).save_pretrained(root / "base")
    for seed, (name, config) in enumerate(CONFIGS.items()):
        model = randomized(apply_adapters(tiny_llama(init_std=0.3), config), seed)
        save_peft(model, root / name)
    return root


@functools.cache
def _model(folders: Path, adapter: str | None) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(folders / "base").eval()
    if adapter is not None:
        load_peft(model, folders / adapter)
    return model


def reference(folders: Path, adapter: str | None, ids: list[int], max_new_tokens: int) -> list[int]:
    """What ``generate`` gives locally: the base with that one adapter, one row, greedy."""
    model = _model(folders, adapter)
    with torch.no_grad():
        row = torch.tensor([ids])
        out = model.generate(
            row,
            attention_mask=torch.ones_like(row),  # token 0 is a token, not padding
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    new = out[0, len(ids) :].tolist()
    eos = model.generation_config.eos_token_id
    return new[: new.index(eos) + 1] if eos in new else new


def prompts(count: int, seed: int = 3) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (count,), generator=generator)
    return [torch.randint(3, VOCAB, (int(n),), generator=generator).tolist() for n in lengths]


def reference_scores(
    folders: Path, adapter: str | None, ids: list[int], choices: list[list[int]]
) -> torch.Tensor:
    """Each choice's summed log probability after ``ids``, one unpadded row at a time."""
    model = _model(folders, adapter)
    scores = []
    with torch.no_grad():
        for choice in choices:
            logits = model(torch.tensor([ids + list(choice)])).logits[0].float()
            log_probs = torch.log_softmax(logits, dim=-1)
            positions = torch.arange(len(ids) - 1, len(ids) - 1 + len(choice))
            scores.append(log_probs[positions, torch.tensor(choice)].sum())
    return torch.stack(scores)


@contextmanager
def serving(arguments: list[str], env: dict[str, str] | None = None) -> Iterator[str]:
    """``lightning-peft serve ARGUMENTS`` on a free loopback port: its URL, once healthy."""
    command = [sys.executable, "-m", "lightning_peft.command", "serve"]
    port = free_port()
    process = subprocess.Popen(
        [*command, "--port", str(port), *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=None if env is None else {**os.environ, **env},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as health:
                    if health.read() == b"ok":
                        break
            except OSError:
                time.sleep(0.5)
        else:
            os.killpg(process.pid, signal.SIGKILL)
            output = process.stdout.read().decode() if process.stdout else ""
            raise RuntimeError(f"the server did not come up:\n{output[-3000:]}")
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def call(
    url: str,
    method: str = "GET",
    body: object = None,
    raw: bytes | None = None,
    key: str | None = None,
):
    """``(status, JSON answer)`` of one request (with ``key`` as a Bearer token)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)
