"""The ``lightning-peft`` console script: each subcommand imports what it needs when it runs,
so ``lightning-peft --help`` answers in the time the package takes to import, not the
seconds Lightning, transformers and LitServe take."""

from __future__ import annotations

import sys
from collections.abc import Sequence

OVERVIEW = """lightning-peft: parameter-efficient fine-tuning with PyTorch Lightning.

subcommands:
  fit, validate, test, predict   LightningCLI with lightning_peft.Trainer (--config run.yaml)
  export                         a checkpoint's adapters as a PEFT folder and/or merged model
  memory                         memory to fine-tune a model of a given size (70B, 135M, ...)
  serve                          one base, many adapters over HTTP (LitServe; pip install
                                 'lightning-peft[serve]')

'lightning-peft SUBCOMMAND --help' describes each (fit --help: every option of the run).
"""


def main(argv: Sequence[str] | None = None) -> None:
    given = list(sys.argv[1:] if argv is None else argv)
    if not given or given[0] in ("-h", "--help"):
        print(OVERVIEW)
        sys.exit(0 if given else 2)
    from lightning_peft.lightning.cli import main as run

    run(argv)
