"""What ``lightning-peft`` leaves out of its output: messages every run prints that say
nothing about the run (a user reading a log should see only what concerns it).

Each is matched by its own text, so a new message of the same library still shows.
"""

from __future__ import annotations

import logging
import warnings

# (logger, start of the message): informational lines printed by every run.
_LOG_LINES = (
    # Lightning's advertisements for its hosted services.
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip:"),
    # bitsandbytes falls back to its own CPU kernel when the optional `kernels` package is
    # missing, which computes the same; it says so at every import.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
)
# (message pattern, category): warnings about the libraries' code, not the user's.
_WARNINGS = (
    # Lightning 2.6's pytree helper on torch 2.13, inside Lightning.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", None),
    # `export` builds LightningCLI from its own arguments while sys.argv holds export's.
    (r"LightningCLI's args parameter is intended to run from within Python", None),
)


class _DropStarting(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def quiet_known_noise() -> None:
    """Filter the known messages out, for this process (the command line calls it)."""
    for name, start in _LOG_LINES:
        logging.getLogger(name).addFilter(_DropStarting(start))
    for pattern, _ in _WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
