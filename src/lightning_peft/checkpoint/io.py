"""Writing checkpoint files atomically: a reader sees the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def partial_path(path: str | os.PathLike[str]) -> Path:
    """Where a file is written before it is renamed to ``path``: hidden, in the same folder.

    The same folder matters: a rename is atomic only within one filesystem. The name carries
    the writer's process id, so what a killed writer left can be told from a live one's.
    """
    target = Path(path)
    return target.with_name(f".{target.name}.partial-{os.getpid()}")


def remove_stale_partials(path: str | os.PathLike[str]) -> int:
    """Remove what writers of ``path`` that no longer run left beside it (a process killed
    mid-write cannot clean up); returns how many. A live writer's files are kept."""
    target = Path(path)
    removed = 0
    prefix = f".{target.name}.partial-"
    for leftover in target.parent.glob(f"{glob.escape(prefix)}*") if target.parent.is_dir() else []:
        pid = leftover.name[len(prefix) :].split("-")[0]
        if not pid.isdigit() or _is_running(int(pid)):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed += 1
    return removed


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the body succeeds, rename it over ``path``.

    If the body raises, the temporary file is removed and ``path`` (a previous checkpoint,
    say) is left as it was. What killed writers of ``path`` left is removed first.
    """
    remove_stale_partials(path)
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
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
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
    remove_stale_partials(folder)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{folder.name}.partial-{os.getpid()}-", dir=folder.parent)
    )
    try:
        yield staging
        if not folder.exists():
            os.rename(staging, folder)  # the whole folder appears at once
            return
        written = sorted(p.name for p in staging.iterdir())
        stale = [n for n in present if owned(n) and n not in written]  # another shard count
        _swap_in(folder, staging, written, stale)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(folder: Path, staging: Path, written: list[str], stale: list[str]) -> None:
    """Move ``written`` from ``staging`` into ``folder`` and take ``stale`` out, keeping each
    replaced file in ``staging/.old`` until all moves are done: if one fails, the moves
    before it are undone and ``folder`` is as it was."""
    old = staging / ".old"
    old.mkdir()
    moved: list[tuple[str, bool]] = []  # (name, had an earlier version)
    try:
        for name in stale:
            os.replace(folder / name, old / name)
            moved.append((name, True))
        for name in written:
            existed = (folder / name).exists()
            if existed:
                os.replace(folder / name, old / name)
            moved.append((name, existed))
            os.replace(staging / name, folder / name)
    except BaseException:
        for name, existed in reversed(moved):
            if existed:
                os.replace(old / name, folder / name)
            else:
                (folder / name).unlink(missing_ok=True)
        raise


# What a transformers tokenizer's save_pretrained writes (fast and slow tokenizers, chat
# templates): a writer that saves a tokenizer owns these names in its folder.
_TOKENIZER_FILES = re.compile(
    r"tokenizer(_config)?\.json|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)"
    r"|merges\.txt|tokenizer\.model|spiece\.model|chat_template\.(jinja|json)"
)


def is_tokenizer_file(name: str) -> bool:
    """Whether ``name`` is one of the files a tokenizer's ``save_pretrained`` writes."""
    return _TOKENIZER_FILES.fullmatch(name) is not None


def held_tokenizer(*holders: Any, needs: str = "save_pretrained") -> Any:
    """The first ``tokenizer`` attribute among ``holders`` (a DataModule, a LightningModule,
    ...; None is skipped) that has the method ``needs``, or None."""
    for holder in holders:
        tokenizer = getattr(holder, "tokenizer", None)
        if callable(getattr(tokenizer, needs, None)):
            return tokenizer
    return None


def owned_with_tokenizer(owned: Callable[[str], bool], tokenizer: Any) -> Callable[[str], bool]:
    """``owned``, plus the tokenizer's files when a tokenizer is written too (only then: a
    tokenizer already in the folder is someone else's when this write brings none)."""
    if tokenizer is None:
        return owned
    return lambda name: owned(name) or is_tokenizer_file(name)
