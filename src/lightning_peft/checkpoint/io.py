"""Writing checkpoint files atomically: a reader sees the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def partial_path(path: str | os.PathLike[str]) -> Path:
    """Where a file is written before it is renamed to ``path``: hidden, in the same folder.

    The same folder matters: a rename is atomic only within one filesystem.
    """
    target = Path(path)
    return target.with_name(f".{target.name}.partial-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the body succeeds, rename it over ``path``.

    If the body raises, the temporary file is removed and ``path`` (a previous checkpoint,
    say) is left as it was.
    """
    temporary = partial_path(path)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
