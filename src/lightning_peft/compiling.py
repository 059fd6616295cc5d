"""Compile an adapted model block by block (regional compilation).

A transformers model repeats one block (a decoder layer) many times; ``torch.compile`` of
each block, rather than of the whole model, compiles that code once and reuses it for every
layer, in seconds rather than minutes. The adapters trace with their blocks: nothing in
their forward breaks the graph (``tests/test_compiling.py``), and bitsandbytes' 4-bit
matmuls are custom ops the compiled graph calls.

Where the step is bound by kernel launches and Python (small batches on a GPU),
``mode="reduce-overhead"`` replays each block as a CUDA graph; ``PeftCallback`` then marks
each step's start for it. Train without a key/value cache (``use_cache=False``, as gradient
checkpointing does): a cache passes each layer's index into its block, and every layer would
compile anew.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The entries of every ``nn.ModuleList`` in ``model`` whose entries are two or more of
    one class (a model's layers), outermost lists only."""
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(entry) for entry in module}) == 1:
            blocks.extend(module)
            inside.update(id(m) for entry in module for m in entry.modules())
    return blocks


def compile_layers(model: nn.Module, mode: str | None = None, **options: Any) -> int:
    """``torch.compile`` each repeated block of ``model`` in place (``nn.Module.compile``),
    with ``mode`` and ``options`` as ``torch.compile`` takes them. Returns how many blocks.

    Raises:
        ValueError: ``model`` has no repeated blocks to compile.
    """
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no repeated blocks (an nn.ModuleList of layers of "
            "one class) to compile; compile the whole model with torch.compile(model) instead"
        )
    for block in blocks:
        block.compile(mode=mode, **options)
    return len(blocks)
