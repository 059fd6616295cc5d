"""Chat instruction tuning: SmolLM2-135M-Instruct, QLoRA, chat rows, completion-only loss.

Rotten Tomatoes reviews become conversations ("Is this review positive or negative? ..." ->
"positive" / "negative"); ``ChatCollator`` renders them with SmolLM2's own chat template
and trains on the assistant's turns only; ``GenerationSamples`` prints what the model
answers to two fixed reviews after each validation. The module knows nothing of adapters:
``lightning_peft.Trainer(precision="nf4-lora")`` brings them.

    python examples/chat_sft.py            # about 4 minutes on 2 CPU cores
    python examples/chat_sft.py --fast     # a smoke run (the tests)
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from torch.utils.data import DataLoader

import lightning_peft
from lightning_peft.data import load_smollm2, rotten_tomatoes, stratified_split
from lightning_peft.lightning import GenerationSamples, InterruptCheckpoint
from lightning_peft.lightning.chat import ANSWERS, review_chat
from lightning_peft.sft import ChatCollator


class ChatModule(L.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.model, self.tokenizer = load_smollm2()
        self.lr = lr

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", self.model(**batch).loss, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


@torch.no_grad()
def answer_accuracy(module: ChatModule, rows: list[tuple[str, int]]) -> float:
    """Greedy answers to held-out reviews: the share whose first word is the right label."""
    model, tokenizer = module.model, module.tokenizer
    was_training = model.training
    model.eval()
    hits = 0
    for review, label in rows:
        ids = tokenizer.apply_chat_template(
            review_chat(review)["messages"], add_generation_prompt=True, return_tensors="pt"
        )
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        words = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).lower().split()
        hits += bool(words) and words[0].strip(".,!") == ANSWERS[label]
    model.train(was_training)
    return hits / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--pack", action="store_true", help="pack rows into full sequences")
    parser.add_argument("--fast", action="store_true", help="2 steps, 4 held-out reviews (tests)")
    args = parser.parse_args()
    if args.fast:
        args.steps, args.eval_size = 2, 4
    start = time.perf_counter()
    L.seed_everything(0, verbose=False)
    module = ChatModule(args.lr)
    train, held_out = stratified_split(
        rotten_tomatoes(), args.steps * args.batch_size, args.eval_size, seed=0
    )
    collate = ChatCollator(module.tokenizer, max_length=256, pack=args.pack)
    data = DataLoader(
        [review_chat(r, y) for r, y in train], args.batch_size, shuffle=True, collate_fn=collate
    )
    val = DataLoader(
        [review_chat(r, y) for r, y in held_out[:16]], args.batch_size, collate_fn=collate
    )
    samples = GenerationSamples(
        [review_chat(r)["messages"] for r, _ in held_out[:2]], max_new_tokens=4
    )

    before = answer_accuracy(module, held_out)
    trainer = lightning_peft.Trainer(
        precision="nf4-lora",
        accelerator="cpu",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=max(1, args.steps // 2),
        callbacks=[samples, InterruptCheckpoint("runs/chat_sft")],  # Ctrl-C: a file to resume from
    )
    trainer.fit(module, data, val)
    after = answer_accuracy(module, held_out)
    print(f"\nChat SFT (QLoRA) on SmolLM2-135M-Instruct, {args.eval_size} held-out reviews")
    print(f"  accuracy before: {before:.3f}   (greedy answer's first word)")
    print(f"  accuracy after:  {after:.3f}   ({args.steps} steps of {args.batch_size} chats)")
    print(f"  last samples:    {[s['completion'] for s in samples.samples]}")
    print(f"  total time:      {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
