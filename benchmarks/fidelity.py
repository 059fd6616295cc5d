"""Does parameter-efficient fine-tuning keep the accuracy of full fine-tuning? In miniature.

The papers' claims, reproduced on real models and real data on a CPU: LoRA comes close to
full fine-tuning with a fraction of a percent of the parameters (Hu et al. 2021, Table 2),
and an NF4 base with double quantization comes close to a 16/32-bit one (Dettmers et al.
2023, Table 3). Every method trains on the same split with the same budget, several seeds.

    bbc  all-MiniLM-L6-v2 + a new head, BBC News headlines (5 topics): 800 train, 400 test,
         3 epochs; every method also trains the head (Unfreeze(["classifier"])), and the
         head alone on the frozen encoder (a linear probe) is the reference row.
    rt   SmolLM2-135M-Instruct, Rotten Tomatoes as "Review: ...\\nSentiment:" -> positive /
         negative (rank classification): 640 balanced train, 200 test, 80 steps; the
         untrained model's zero-shot accuracy is the reference row.

Writes benchmarks/results/fidelity-<task>.md (accuracy mean ± std over seeds, trainable
parameters, adapter checkpoint size), a PNG plot of accuracy against trainable parameters,
and the raw numbers as fidelity-<task>.json (``--replot`` redraws from them).

    python benchmarks/fidelity.py --task bbc --seeds 0 1 2      # about 6 minutes on 2 cores
    python benchmarks/fidelity.py --task rt --seeds 0 1 2       # about 70 minutes
    python benchmarks/fidelity.py --task rt --add --methods "LoRA r=8 (q, v)"   # one row again
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import statistics
import time
from pathlib import Path

import torch

from lightning_peft import (
    IA3,
    BitFit,
    BottleneckAdapter,
    LoRA,
    PrefixTuning,
    PromptTuning,
    Unfreeze,
    adapter_state_dict,
    apply_adapters,
    count_parameters,
)
from lightning_peft.quantization import quantize_model

RESULTS = Path(__file__).parent / "results"
HEAD = Unfreeze(["classifier"])
ZERO_SHOT = "zero-shot (no training)"

# method: (adapters or None for full fine-tuning, quantize to NF4 first, learning rate)
BBC_METHODS = {
    # The reference: what the adapters add to the head. A probe needs a higher rate than the
    # methods' 1e-3, which left it at 0.55 after these 150 steps.
    "head only (linear probe)": ([HEAD], False, 1e-2),
    "full fine-tuning": (None, False, 1e-4),
    "LoRA r=8 (q, v)": (
        [LoRA(rank=8, alpha=16, target_modules=["query", "value"]), HEAD],
        False,
        1e-3,
    ),
    "QLoRA: NF4 + LoRA r=8": (
        [LoRA(rank=8, alpha=16, target_modules=["query", "value"]), HEAD],
        True,
        1e-3,
    ),
    "QLoRA + LoftQ: NF4 + LoRA r=8": (
        [LoRA(rank=8, alpha=16, target_modules=["query", "value"], init="loftq"), HEAD],
        True,
        1e-3,
    ),
    "(IA)^3": (
        [IA3(target_modules=["key", "value", "intermediate.dense"], feedforward_modules=[]), HEAD],
        False,
        3e-3,
    ),
    "bottleneck (Pfeiffer, /16)": (
        [
            BottleneckAdapter(
                placement="pfeiffer", feedforward_modules=r".*layer\.\d+\.output\.dense"
            ),
            HEAD,
        ],
        False,
        1e-3,
    ),
    "BitFit": ([BitFit(), HEAD], False, 3e-3),
    "prompt tuning (20)": ([PromptTuning(num_virtual_tokens=20), HEAD], False, 3e-2),
}


@functools.cache
def rt_methods() -> dict:
    """SmolLM2's methods; learning rates are the examples' (tuned by hand on a different seed).
    Built on first call, not at import: the text-initialized prompt and prefix need the
    converted SmolLM2 tokenizer, which --task bbc does not."""
    from lightning_peft.data import smollm2_path

    instruction = {
        "init": "text",
        "init_text": "Is this movie review positive or negative?",
        "tokenizer_name_or_path": str(smollm2_path()),
    }
    lora = LoRA(rank=8, alpha=16, target_modules=["q_proj", "v_proj"])
    loftq = LoRA(rank=8, alpha=16, target_modules=["q_proj", "v_proj"], init="loftq")
    loftq_all = LoRA(rank=8, alpha=16, target_modules="all-linear", init="loftq")
    return {
        ZERO_SHOT: (None, False, None),
        # What the 4-bit base costs before training, and what LoftQ's start wins back.
        "zero-shot, NF4 base": (None, True, None),
        "zero-shot, NF4 + LoftQ r=8 (q, v) at init": (loftq, True, None),
        "zero-shot, NF4 + LoftQ r=8 (all linear) at init": (loftq_all, True, None),
        "full fine-tuning": (None, False, 1e-5),
        "LoRA r=8 (q, v)": (lora, False, 3e-4),
        "QLoRA: NF4 + LoRA r=8 (q, v)": (lora, True, 3e-4),
        "QLoRA + LoftQ: NF4 + LoRA r=8 (q, v)": (loftq, True, 3e-4),
        "QLoRA + LoftQ: NF4 + LoRA r=8 (all linear)": (loftq_all, True, 3e-4),
        "(IA)^3": (IA3(), False, 1e-2),
        "bottleneck (Pfeiffer, /16)": (
            BottleneckAdapter(reduction_factor=16, placement="pfeiffer", activation="silu"),
            False,
            3e-4,
        ),
        "prompt tuning (12, text init)": (
            PromptTuning(num_virtual_tokens=12, **instruction),
            False,
            3e-3,
        ),
        "prefix tuning (10, text init)": (
            PrefixTuning(num_virtual_tokens=10, reparametrize=False, **instruction),
            False,
            1e-3,
        ),
    }


def checkpoint_bytes(model: torch.nn.Module, full: bool) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict() if full else adapter_state_dict(model), buffer)
    return buffer.tell()


def prepare(model: torch.nn.Module, adapters, nf4: bool) -> torch.nn.Module:
    if nf4:  # with the adapters in the same call: LoftQ reads the float weights
        quantize_model(model, "nf4", adapters=adapters)
    elif adapters is not None:
        apply_adapters(model, adapters)
    if adapters is None:
        model.requires_grad_(True)
    return model


def run_bbc(method: str, seed: int) -> dict:
    from lightning_peft.data import BBC_TOPICS, bbc_headlines, load_minilm, stratified_split

    adapters, nf4, lr = BBC_METHODS[method]
    torch.manual_seed(seed)
    model, tokenizer = load_minilm(num_labels=len(BBC_TOPICS))
    model = prepare(model, adapters, nf4).train()
    train, test = stratified_split(bbc_headlines(), 800, 400, seed=0)  # one split, many seeds

    def batches(rows, size, shuffle):
        order = torch.randperm(len(rows)).tolist() if shuffle else range(len(rows))
        rows = [rows[i] for i in order]
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            encoded = tokenizer(
                [t for t, _ in chunk],
                padding=True,
                truncation=True,
                max_length=32,
                return_tensors="pt",
            )
            yield encoded, torch.tensor([y for _, y in chunk])

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(3):
        for encoded, labels in batches(train, 16, shuffle=True):
            model(**encoded, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        hits = sum(
            (model(**e).logits.argmax(-1) == y).sum().item() for e, y in batches(test, 64, False)
        )
    return result(model, adapters, hits / len(test))


def run_rt(method: str, seed: int) -> dict:
    from lightning_peft.data import load_smollm2
    from lightning_peft.lightning.tasks import (
        accuracy,
        answer_ids,
        answer_scores,
        review_loader,
        review_split,
    )

    adapters, nf4, lr = rt_methods()[method]
    torch.manual_seed(seed)
    model, tokenizer = load_smollm2()
    train, test = review_split(640, 200, seed=0)
    if lr is None:  # a reference: the model as shipped (or as it starts), nothing trained
        if nf4:  # the NF4 base, with LoftQ's starting adapters where the row has them
            quantize_model(model, "nf4", adapters=adapters)
        acc = accuracy(model.requires_grad_(False), tokenizer, test)
        return {"accuracy": acc, "trainable": 0, "checkpoint_bytes": 0}
    model = prepare(model, adapters, nf4).train()
    answers = answer_ids(tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for batch in review_loader(tokenizer, train, 8, shuffle=True):
        loss = torch.nn.functional.cross_entropy(
            answer_scores(model, batch, answers), batch["label"]
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return result(model, adapters, accuracy(model, tokenizer, test))


def result(model: torch.nn.Module, adapters, acc: float) -> dict:
    return {
        "accuracy": acc,
        "trainable": count_parameters(model).trainable,
        "checkpoint_bytes": checkpoint_bytes(model, full=adapters is None),
    }


def write(
    task: str, rows: dict[str, list[dict]], seeds: list[int], seconds: float, threads: int
) -> str:
    title = {
        "bbc": "all-MiniLM-L6-v2 (22.7M), BBC News headlines, 5 topics: 800 train / 400 test, 3 epochs",
        "rt": "SmolLM2-135M-Instruct, Rotten Tomatoes: 640 balanced train / 200 test, 80 steps of 8",
    }[task]
    lines = [
        f"Fidelity, {title}; seeds {seeds}; {seconds / 60:.0f} min on {threads} CPU threads.",
        "",
        "| method | accuracy (mean ± std) | trainable params | % of full | checkpoint |",
        "|---|---:|---:|---:|---:|",
    ]
    full = rows["full fine-tuning"][0]["trainable"] if "full fine-tuning" in rows else None
    for method, runs in rows.items():
        accs = [r["accuracy"] for r in runs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        trainable = runs[0]["trainable"]
        share = f"{100 * trainable / full:.2f}%" if full else "-"
        size = runs[0]["checkpoint_bytes"]
        size = f"{size / 2**20:.2f} MiB" if size else "-"
        lines.append(
            f"| {method} | {statistics.mean(accs):.3f} ± {std:.3f} | {trainable:,} | {share} | "
            f"{size} |"
        )
    return "\n".join(lines) + "\n"


def plot(task: str, rows: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8.4, 4))
    for method, runs in rows.items():
        accs = [r["accuracy"] for r in runs]
        if not runs[0]["trainable"]:  # nothing trained: a reference line, not a log-axis point
            axes.axhline(statistics.mean(accs), linestyle="--", linewidth=1, label=method)
            continue
        axes.errorbar(
            runs[0]["trainable"],
            statistics.mean(accs),
            yerr=statistics.stdev(accs) if len(accs) > 1 else 0,
            fmt="o",
            capsize=3,
            label=method,
        )
    axes.set_xscale("log")
    axes.set_xlabel("trainable parameters")
    axes.set_ylabel("held-out accuracy")
    seeds = max(len(runs) for runs in rows.values())
    name = {"bbc": "MiniLM + BBC headlines", "rt": "SmolLM2-135M + Rotten Tomatoes"}[task]
    axes.set_title(f"{name}: mean ± std over {seeds} seeds")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["bbc", "rt"], default="bbc")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", help="a subset of the method names")
    parser.add_argument(
        "--add",
        action="store_true",
        help="keep the saved results of the other methods (same seeds) and add or replace "
        "these methods' rows",
    )
    parser.add_argument(
        "--replot",
        action="store_true",
        help="rewrite the table and plot from the saved results/fidelity-<task>.json; trains nothing",
    )
    args = parser.parse_args()
    raw = RESULTS / f"fidelity-{args.task}.json"
    if args.replot:
        if not raw.exists():
            parser.error(f"--replot reads {raw}, which does not exist: run without --replot first")
        saved = json.loads(raw.read_text())
    else:
        previous = json.loads(raw.read_text()) if args.add and raw.exists() else None
        if previous is not None and previous["seeds"] != args.seeds:
            parser.error(f"--add needs the saved seeds {previous['seeds']}, got {args.seeds}")
        saved = measure(parser, args)
        if previous is not None:  # the methods' order stays the table's, new ones in place
            order = list(rt_methods() if args.task == "rt" else BBC_METHODS)
            rows = {**previous["rows"], **saved["rows"]}
            rank = {m: i for i, m in enumerate(order)}  # rows no longer in the table last
            saved["rows"] = {
                m: rows[m] for m in sorted(rows, key=lambda m: rank.get(m, len(order)))
            }
            saved["seconds"] += previous["seconds"]
        RESULTS.mkdir(exist_ok=True)
        raw.write_text(json.dumps(saved, indent=1) + "\n")
    text = write(args.task, **saved)
    print("\n" + text)
    (RESULTS / f"fidelity-{args.task}.md").write_text(text)
    plot(args.task, saved["rows"], RESULTS / f"fidelity-{args.task}.png")


def measure(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    methods, run = (BBC_METHODS, run_bbc) if args.task == "bbc" else (rt_methods(), run_rt)
    unknown = sorted(set(args.methods or ()) - set(methods))
    if unknown:
        parser.error(f"unknown --methods {unknown}; the {args.task} methods are {list(methods)}")
    started = time.perf_counter()
    rows: dict[str, list[dict]] = {}
    for method in args.methods or methods:
        for seed in args.seeds:
            rows.setdefault(method, []).append(run(method, seed))
            print(
                f"{method:<32} seed {seed}: accuracy {rows[method][-1]['accuracy']:.3f}", flush=True
            )
    return {
        "rows": rows,
        "seeds": args.seeds,
        "seconds": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    main()
