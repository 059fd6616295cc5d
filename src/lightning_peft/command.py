"""The ``lightning-peft`` console script: each subcommand imports what it needs when it runs,
so ``lightning-peft --help`` answers in the time the package takes to import, not the
seconds Lightning, transformers and LitServe take."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning_peft.usage import OVERVIEW


def main(argv: Sequence[str] | None = None) -> None:
    given = list(sys.argv[1:] if argv is None else argv)
    if not given or given[0] in ("-h", "--help"):
        print(OVERVIEW)
        sys.exit(0 if given else 2)
    if given[0] == "serve":  # serving needs no Lightning: it is not below lightning.cli
        from lightning_peft.quiet import quiet_known_noise
        from lightning_peft.serving.cli import serve

        quiet_known_noise()
        serve(given[1:])
        return
    from lightning_peft.lightning.cli import main as run

    run(argv)


if __name__ == "__main__":
    main()
