"""Writing checkpoint files atomically: a reader sees the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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


def check_folder_target(
    target: str | os.PathLike[str], owned: Callable[[str], bool], *, overwrite: bool
) -> list[str]:
    """The names in folder ``target`` (none if it does not exist yet), after checking that a
    writer owning ``owned`` names may write there; raises as :func:`staged_folder` does."""
    folder = Path(target)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file, not a folder: give a folder path")
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    foreign = [name for name in present if not owned(name)]
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{folder} is not empty (it holds {shown}); write to a new or empty folder, or "
            "pass overwrite=True to replace only this writer's own files there and keep the rest"
        )
    return present


@contextlib.contextmanager
def staged_folder(
    target: str | os.PathLike[str], owned: Callable[[str], bool], *, overwrite: bool
) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``target`` to write into; when the body succeeds,
    move what it wrote into ``target``, file by file (each rename is atomic).

    Nothing in ``target`` is touched before the body has written everything, so a failure
    while writing leaves ``target`` exactly as it was, and the staging folder is removed.
    ``owned(name)`` says which names in ``target`` this writer may replace or remove (its
    own files from an earlier write); anything else there is never deleted or moved.

    Raises:
        FileExistsError: ``target`` is a file, or a folder holding files this writer does
            not own while ``overwrite`` is False. Raised before the body runs.
    """
    folder = Path(target)
    present = check_folder_target(folder, owned, overwrite=overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        yield staging
        if not folder.exists():
            staging.rename(folder)  # the whole folder appears at once
            return
        written = {p.name for p in staging.iterdir()}
        for name in present:  # a stale file of an earlier write (another shard count, say)
            if owned(name) and name not in written:
                (folder / name).unlink()
        for name in sorted(written):
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
