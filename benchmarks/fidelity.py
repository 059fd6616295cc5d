"""Does parameter-efficient fine-tuning keep the accuracy of full fine-tuning? In miniature.

The papers' claims, reproduced on real models and real data on a CPU: LoRA comes close to
full fine-tuning with a fraction of a percent of the parameters (Hu et al. 2021, Table 2),
and an NF4 base with double quantization comes close to a 16/32-bit one (Dettmers et al.
2023, Table 3). Every method trains on the same split with the same budget, several seeds.

    bbc  all-MiniLM-L6-v2 + a new head, BBC News headlines (5 topics): 800 train, 400 test,
         3 epochs; every method also trains the head (Unfreeze(["classifier"])).
    rt   SmolLM2-135M-Instruct, Rotten Tomatoes as "Review: ...\\nSentiment:" -> positive /
         negative (rank classification): 640 balanced train, 200 test, 80 steps.

Writes benchmarks/results/fidelity-<task>.md (accuracy mean ± std over seeds, trainable
parameters, adapter checkpoint size) and a PNG plot of accuracy against trainable parameters.

    python benchmarks/fidelity.py --task bbc --seeds 0 1 2      # about 10 minutes on 2 cores
    python benchmarks/fidelity.py --task rt --seeds 0           # about 15 minutes
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import torch

from lightning_peft import (
    IA3,
    BitFit,
    BottleneckAdapter,
    LoRA,
    PromptTuning,
    Unfreeze,
    adapter_state_dict,
    apply_adapters,
    count_parameters,
)
from lightning_peft.quantization import quantize_model

RESULTS = Path(__file__).parent / "results"
HEAD = Unfreeze(["classifier"])

# method: (adapters or None for full fine-tuning, quantize to NF4 first, learning rate)
BBC_METHODS = {
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
RT_METHODS = {
    "full fine-tuning": (None, False, 1e-5),
    "LoRA r=8 (q, v)": (LoRA(rank=8, alpha=16, target_modules=["q_proj", "v_proj"]), False, 3e-4),
    "QLoRA: NF4 + LoRA r=8 (q, v)": (
        LoRA(rank=8, alpha=16, target_modules=["q_proj", "v_proj"]),
        True,
        3e-4,
    ),
    "(IA)^3": (IA3(), False, 1e-2),
}


def checkpoint_bytes(model: torch.nn.Module, full: bool) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict() if full else adapter_state_dict(model), buffer)
    return buffer.tell()


def prepare(model: torch.nn.Module, adapters, nf4: bool) -> torch.nn.Module:
    if nf4:
        quantize_model(model, "nf4")
    if adapters is None:
        model.requires_grad_(True)
    else:
        apply_adapters(model, adapters)
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

    adapters, nf4, lr = RT_METHODS[method]
    torch.manual_seed(seed)
    model, tokenizer = load_smollm2()
    model = prepare(model, adapters, nf4).train()
    train, test = review_split(640, 200, seed=0)
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


def write(task: str, rows: dict[str, list[dict]], seeds: list[int], seconds: float) -> str:
    title = {
        "bbc": "all-MiniLM-L6-v2 (22.7M), BBC News headlines, 5 topics: 800 train / 400 test, 3 epochs",
        "rt": "SmolLM2-135M-Instruct, Rotten Tomatoes: 640 balanced train / 200 test, 80 steps of 8",
    }[task]
    lines = [
        f"Fidelity, {title}; seeds {seeds}; {seconds / 60:.0f} min on {torch.get_num_threads()} CPU threads.",
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
        lines.append(
            f"| {method} | {statistics.mean(accs):.3f} ± {std:.3f} | {trainable:,} | {share} | "
            f"{runs[0]['checkpoint_bytes'] / 2**20:.2f} MiB |"
        )
    return "\n".join(lines) + "\n"


def plot(task: str, rows: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4))
    for method, runs in rows.items():
        accs = [r["accuracy"] for r in runs]
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
    axes.set_title(f"fidelity: {task}")
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["bbc", "rt"], default="bbc")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", help="a subset of the method names")
    args = parser.parse_args()
    methods, run = (BBC_METHODS, run_bbc) if args.task == "bbc" else (RT_METHODS, run_rt)
    chosen = args.methods or list(methods)
    started = time.perf_counter()
    rows: dict[str, list[dict]] = {}
    for method in chosen:
        for seed in args.seeds:
            rows.setdefault(method, []).append(run(method, seed))
            print(
                f"{method:<32} seed {seed}: accuracy {rows[method][-1]['accuracy']:.3f}", flush=True
            )
    text = write(args.task, rows, args.seeds, time.perf_counter() - started)
    print("\n" + text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"fidelity-{args.task}.md").write_text(text)
    plot(args.task, rows, RESULTS / f"fidelity-{args.task}.png")


if __name__ == "__main__":
    main()
