"""Snapshots of a model and of a folder, to assert that a refused operation changed nothing."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch


def model_snapshot(model: torch.nn.Module) -> tuple[str, dict[str, torch.Tensor], dict]:
    """The module structure (its repr), a copy of every tensor of its state dict, and its
    transformers config (merging a tied head changes ``tie_word_embeddings``)."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return repr(model), tensors, _config(model)


def _config(model: torch.nn.Module) -> dict:
    config = getattr(model, "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else {}


def assert_model_unchanged(model: torch.nn.Module, snapshot: tuple) -> None:
    structure, tensors, config = snapshot
    assert repr(model) == structure
    assert _config(model) == config
    now = model.state_dict()
    assert now.keys() == tensors.keys()
    for key, value in tensors.items():
        assert now[key].dtype == value.dtype and torch.equal(now[key], value), key


def folder_snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder``'s parent (so siblings a writer might leave count too):
    files with their bytes, folders as None."""
    root = Path(folder).parent
    return {
        str(path.relative_to(root)): (path.read_bytes() if path.is_file() else None)
        for path in sorted(root.rglob("*"))
    }


def assert_folder_unchanged(folder: Path, snapshot: dict[str, bytes | None]) -> None:
    now = folder_snapshot(folder)
    assert sorted(now) == sorted(snapshot), "paths added or removed"
    changed = [path for path in snapshot if now[path] != snapshot[path]]
    assert not changed, f"changed: {changed}"


@contextlib.contextmanager
def refused_without_a_trace(model: torch.nn.Module, error: type, match: str | None = None):
    """``pytest.raises(error, match=match)`` that also asserts ``model`` is unchanged."""
    before = model_snapshot(model)
    with pytest.raises(error, match=match) as info:
        yield info
    assert_model_unchanged(model, before)
