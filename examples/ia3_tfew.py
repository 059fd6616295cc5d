"""(IA)^3 with the T-Few recipe on a real model: SmolLM2-135M-Instruct, Rotten Tomatoes.

(IA)^3 learns three vectors per layer that rescale keys, values and the feed-forward
activation (0.04% of the parameters here). T-Few trains them on every answer choice at once:
the usual loss on the right answer, an unlikelihood loss pushing the wrong answer down, and
a length-normalized loss over the choices; predictions are rank classification.

    python examples/ia3_tfew.py            # about 4 minutes on 2 CPU cores
"""

from __future__ import annotations

import torch
from common import parse_args, run

from lightning_peft import IA3
from lightning_peft.lightning.tasks import ReviewSentiment
from lightning_peft.tfew import tfew_losses
from lightning_peft.tfew_metric import RankClassificationAccuracy


class TFewSentimentLM(ReviewSentiment):
    """Scores every review with both answers appended, and trains on the T-Few losses."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.train_accuracy = RankClassificationAccuracy()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]  # (B, T), left-padded
        choices = len(self.answers)
        # Row b·C + c is review b followed by answer c: (B·C, T + 1).
        rows = torch.cat(
            [ids.repeat_interleave(choices, 0), self.answers.repeat(len(ids))[:, None]], 1
        )
        row_mask = torch.cat([mask.repeat_interleave(choices, 0), mask.new_ones(len(rows), 1)], 1)
        labels = torch.full_like(rows, -100)
        labels[:, -1] = rows[:, -1]  # only the answer token is scored
        logits = self.model(input_ids=rows, attention_mask=row_mask).logits
        losses = tfew_losses(logits, labels, batch["label"], num_choices=choices)
        self.train_accuracy(losses.scores, batch["label"])
        self.log_dict(
            {"lm": losses.lm, "ul": losses.unlikelihood, "ln": losses.length_normalized},
            prog_bar=True,
        )
        self.log("train_rank_acc", self.train_accuracy, prog_bar=True)
        return losses.total


if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0], steps=60, lr=1e-2)
    # SmolLM2 is a Llama: keys, values and the second feed-forward projection.
    run("(IA)^3 + T-Few losses", IA3(), args, module_class=TFewSentimentLM)
