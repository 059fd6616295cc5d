"""Distillation in miniature, DistilBERT's recipe on a CPU: a half-depth student learns
BBC News topics from the labels alone, or from the labels and a fine-tuned teacher.

    teacher    all-MiniLM-L6-v2 (6 layers) + a new head, fine-tuned on the labels
    hard       shrink(MiniLM): layers 0, 2, 4 of the pretrained encoder + a new head,
               trained on the labels alone
    distilled  the same student, trained with Distillation(teacher, temperature=2, alpha=0.5)

Every model trains with lightning.Trainer on the same 800 headlines (400 held out), 4 epochs
of 16, AdamW; the students' training_step is the teacher's. For each of several seeds it
prints held-out accuracy, and once the parameters and the inference latency (median of 20
batches of 64 headlines). Writes benchmarks/results/distillation.md|json|png.

    python benchmarks/distillation.py              # 3 seeds, about 6 minutes on 2 cores
    python benchmarks/distillation.py --replot     # table and plot from the saved numbers
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch

RESULTS = Path(__file__).parent / "results"
ROWS = ("teacher (6 layers)", "student (3 layers), labels only", "student (3 layers), distilled")
EPOCHS, BATCH, LR = 4, 16, 1e-4


class TopicClassifier(L.LightningModule):
    """An ordinary module: its model's loss on the labels; nothing about distillation."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=LR)


def loaders(tokenizer, seed: int):
    from lightning_peft.data import bbc_headlines, stratified_split

    train, test = stratified_split(bbc_headlines(), 800, 400, seed=0)  # one split, many seeds

    def collate(rows):
        batch = tokenizer(
            [t for t, _ in rows], padding=True, truncation=True, max_length=32, return_tensors="pt"
        )
        return {**batch, "labels": torch.tensor([y for _, y in rows])}

    generator = torch.Generator().manual_seed(seed)
    train_loader = torch.utils.data.DataLoader(
        train, BATCH, shuffle=True, collate_fn=collate, generator=generator
    )
    return train_loader, [collate(test[i : i + 64]) for i in range(0, len(test), 64)]


def train(model: torch.nn.Module, data, callbacks=()) -> torch.nn.Module:
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(TopicClassifier(model.train()), data)
    return model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, test_batches) -> float:
    model.eval()
    hits = sum(
        (model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1) == b["labels"])
        .sum()
        .item()
        for b in test_batches
    )
    return hits / sum(len(b["labels"]) for b in test_batches)


@torch.no_grad()
def latency_ms(model: torch.nn.Module, batch: dict) -> float:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    for _ in range(3):
        model(**inputs)
    times = []
    for _ in range(20):
        started = time.perf_counter()
        model(**inputs)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def run_seed(seed: int) -> dict[str, dict]:
    from lightning_peft import Distillation
    from lightning_peft.data import BBC_TOPICS, load_minilm
    from lightning_peft.distillation import shrink

    L.seed_everything(seed, verbose=False)
    teacher, tokenizer = load_minilm(num_labels=len(BBC_TOPICS))
    pretrained = shrink(teacher)  # before the teacher trains: DistilBERT's initialisation
    data, test = loaders(tokenizer, seed)
    teacher = train(teacher, data)  # each model below gets a fresh loader: the same order
    results = {}
    for name, model, callbacks in (
        (ROWS[0], teacher, None),
        (ROWS[1], copy.deepcopy(pretrained), ()),
        (ROWS[2], copy.deepcopy(pretrained), (Distillation(teacher, temperature=2.0, alpha=0.5),)),
    ):
        if callbacks is not None:
            L.seed_everything(seed, verbose=False)
            model = train(model, loaders(tokenizer, seed)[0], callbacks)
        results[name] = {
            "accuracy": accuracy(model, test),
            "parameters": sum(p.numel() for p in model.parameters()),
            "latency_ms": latency_ms(model, test[0]),
        }
        print(f"seed {seed} {name:<34} accuracy {results[name]['accuracy']:.3f}", flush=True)
    return results


def write(rows: dict[str, list[dict]], seeds: list[int], seconds: float, threads: int) -> str:
    teacher = rows[ROWS[0]]
    teacher_acc = statistics.mean(r["accuracy"] for r in teacher)
    teacher_ms = statistics.median(r["latency_ms"] for r in teacher)
    lines = [
        f"Distillation, all-MiniLM-L6-v2 on BBC News headlines (5 topics): 800 train / 400 test, "
        f"{EPOCHS} epochs of {BATCH}; seeds {seeds}; latency: median of 20 batches of 64 "
        f"headlines; {seconds / 60:.0f} min on {threads} CPU threads.",
        "",
        "| model | accuracy (mean ± std) | % of teacher's accuracy | parameters | % of teacher's size | latency (ms) | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ROWS:
        runs = rows[name]
        accs = [r["accuracy"] for r in runs]
        ms = statistics.median(r["latency_ms"] for r in runs)
        params = runs[0]["parameters"]
        lines.append(
            f"| {name} | {statistics.mean(accs):.3f} ± {statistics.stdev(accs) if len(accs) > 1 else 0:.3f} | "
            f"{100 * statistics.mean(accs) / teacher_acc:.1f}% | {params / 1e6:.1f}M | "
            f"{100 * params / teacher[0]['parameters']:.0f}% | {ms:.1f} | {teacher_ms / ms:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.6))
    for name in ROWS:
        runs = rows[name]
        accs = [r["accuracy"] for r in runs]
        axes.errorbar(
            statistics.median(r["latency_ms"] for r in runs),
            statistics.mean(accs),
            yerr=statistics.stdev(accs) if len(accs) > 1 else 0,
            fmt="o",
            capsize=3,
            label=name,
        )
    axes.set_xlabel("latency, batch of 64 headlines (ms)")
    axes.set_ylabel("held-out accuracy")
    axes.set_title(f"MiniLM + BBC headlines: mean ± std over {len(rows[ROWS[0]])} seeds")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--replot", action="store_true", help="redraw from the saved numbers")
    args = parser.parse_args()
    raw = RESULTS / "distillation.json"
    if args.replot:
        saved = json.loads(raw.read_text())
    else:
        started = time.perf_counter()
        rows: dict[str, list[dict]] = {name: [] for name in ROWS}
        for seed in args.seeds:
            for name, result in run_seed(seed).items():
                rows[name].append(result)
        saved = {
            "rows": rows,
            "seeds": args.seeds,
            "seconds": time.perf_counter() - started,
            "threads": torch.get_num_threads(),
        }
        RESULTS.mkdir(exist_ok=True)
        raw.write_text(json.dumps(saved, indent=1) + "\n")
    text = write(**saved)
    print("\n" + text)
    (RESULTS / "distillation.md").write_text(text)
    plot(saved["rows"], RESULTS / "distillation.png")


if __name__ == "__main__":
    main()
