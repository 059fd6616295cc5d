"""Prompt tuning on a real model: a soft prompt for SmolLM2-135M-Instruct, Rotten Tomatoes.

Twelve trainable embeddings go in front of every review; the model stays frozen. They start
as the embeddings of a written instruction (Lester et al. 2021 §3.2), so before training the
model sees that instruction, and training moves them to where words cannot go.

    python examples/prompt_tuning.py       # about 4 minutes on 2 CPU cores
"""

from __future__ import annotations

from common import parse_args, run

from lightning_peft import PromptTuning
from lightning_peft.data import smollm2_path

if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0], steps=120, lr=3e-3)
    prompt = PromptTuning(
        num_virtual_tokens=12,
        init="text",
        init_text="Is this movie review positive or negative?",
        tokenizer_name_or_path=str(smollm2_path()),
    )
    run("Prompt tuning (12 virtual tokens)", prompt, args)
