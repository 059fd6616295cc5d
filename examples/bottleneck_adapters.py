"""Bottleneck adapters on a real model: SmolLM2-135M-Instruct, Rotten Tomatoes.

Houlsby et al. (2019) put a small residual MLP (down-project, nonlinearity, up-project) after
each attention block and each feed-forward block; ``--placement pfeiffer`` keeps only the
feed-forward one (Pfeiffer et al. 2020). The up-projection starts at zero, so training starts
from the pretrained model's own answers.

    python examples/bottleneck_adapters.py [--placement pfeiffer]   # about 4 minutes
"""

from __future__ import annotations

from common import parse_args, run

from lightning_peft import BottleneckAdapter

if __name__ == "__main__":
    args = parse_args(
        __doc__.splitlines()[0],
        steps=120,
        lr=3e-4,
        extra=lambda p: p.add_argument(
            "--placement", choices=["houlsby", "pfeiffer"], default="houlsby"
        ),
    )
    adapters = BottleneckAdapter(reduction_factor=16, placement=args.placement, activation="silu")
    run(f"Bottleneck adapters ({args.placement}, 576 -> 36)", adapters, args)
