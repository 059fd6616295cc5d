"""Prefix tuning on a real model: SmolLM2-135M-Instruct, Rotten Tomatoes.

Every attention layer gets 10 trainable key/value positions in front of the input's. They
start as the keys and values the frozen model computes for a written instruction (Li & Liang
2021 §7.2: real-word initialisation beats random), so training starts from the model with
that instruction in front. (``PrefixTuning()`` alone gives the paper's MLP-reparametrized
random start; ``fold_prefix_`` removes the MLP after training.)

    python examples/prefix_tuning.py       # about 4 minutes on 2 CPU cores
"""

from __future__ import annotations

from common import parse_args, run

from lightning_peft import PrefixTuning
from lightning_peft.data import smollm2_path

if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0], steps=120, lr=1e-3)
    prefix = PrefixTuning(
        num_virtual_tokens=10,
        reparametrize=False,
        init="text",
        init_text="Is this movie review positive or negative?",
        tokenizer_name_or_path=str(smollm2_path()),
    )
    run("Prefix tuning (10 virtual tokens)", prefix, args)
