"""Every writer, every write step failing in turn, and a writer killed mid-save.

The writers: ``AdapterCheckpoint`` (through Lightning's CheckpointIO), ``save_peft``,
``merge_and_export`` and ``lightning-peft export``. After a failure the previous files are
exactly as they were and nothing half-written is left; after a SIGKILL every file under its
own name is complete (it loads) and the hidden leftovers are cleared by the next write.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

import lightning_peft.checkpoint.io as checkpoint_io
from lightning_peft import (
    AdapterCheckpoint,
    PeftCallback,
    load_peft,
    save_peft,
)
from lightning_peft.checkpoint.export import merge_and_export
from tests.lightning_modules import QV_LORA, CausalLM, fit
from tests.snapshots import assert_folder_unchanged, folder_snapshot
from tests.tiny_models import adapted_llama as adapted
from tests.tiny_models import tiny_llama

CHECKOUT = Path(__file__).parent.parent  # where the tests package is imported from


class Failing:
    """Wraps a function so that its ``n``-th call (1-based) raises instead of running."""

    def __init__(self, function: Callable, n: int) -> None:
        self.function, self.n, self.calls = function, n, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise OSError(f"injected failure at call {self.n}")
        return self.function(*args, **kwargs)


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.rglob(".*partial*"))


def first_then_failing_second(write: Callable[[int], None], target: Path, monkeypatch, step):
    """Write version 0, then version 1 with ``step`` (module, name, n) failing; assert the
    failure left version 0's files exactly as they were and no leftovers."""
    write(0)
    before = folder_snapshot(target)
    module, name, n = step
    failing = Failing(getattr(module, name), n)
    monkeypatch.setattr(module, name, failing)
    with pytest.raises(OSError, match="injected failure"):
        write(1)
    monkeypatch.undo()
    assert_folder_unchanged(target, before)
    assert not hidden_leftovers(target)


def rename(n: int) -> tuple:
    return (os, "replace", n)


def test_save_peft_fails_at_each_step_without_a_trace(tmp_path, monkeypatch):
    import safetensors.torch

    # weights written; then for each of the two files: old one aside, new one in (4 renames)
    steps = [(safetensors.torch, "save_file", 1), *(rename(n) for n in (1, 2, 3, 4))]
    for i, step in enumerate(steps):
        target = tmp_path / str(i) / "adapter"
        target.mkdir(parents=True)
        (target / "tokenizer.json").write_text("{}")  # someone else's file beside the adapter
        first_then_failing_second(
            lambda seed, t=target: save_peft(adapted(seed), t), target, monkeypatch, step
        )


def test_merge_and_export_into_a_new_folder_fails_at_each_step_without_a_trace(
    tmp_path, monkeypatch
):
    model_class = type(tiny_llama())
    for i, step in enumerate([(model_class, "save_pretrained", 1), (os, "rename", 1)]):
        target = tmp_path / str(i) / "merged"
        monkeypatch.setattr(step[0], step[1], Failing(getattr(step[0], step[1]), step[2]))
        with pytest.raises(OSError, match="injected failure"):
            merge_and_export(adapted(1), target)
        monkeypatch.undo()
        assert not target.exists() and not hidden_leftovers(target)


def test_merge_and_export_over_an_earlier_one_fails_at_each_step_without_a_trace(
    tmp_path, monkeypatch
):
    model_class = type(tiny_llama())
    # three files (config, generation config, weights), each: old one aside, new one in
    steps = [(model_class, "save_pretrained", 1), *(rename(n) for n in (1, 2, 4, 6))]
    for i, step in enumerate(steps):
        target = tmp_path / str(i) / "merged"
        target.mkdir(parents=True)
        (target / "tokenizer.json").write_text("{}")

        def write(seed: int, t: Path = target) -> None:
            merge_and_export(adapted(seed), t, overwrite=True)

        first_then_failing_second(write, target, monkeypatch, step)


@pytest.mark.parametrize(
    "step", [(TorchCheckpointIO, "save_checkpoint", 1), rename(1)], ids=["write", "rename"]
)
def test_adapter_checkpoint_fails_at_each_step_without_a_trace(step, tmp_path, monkeypatch):
    target = tmp_path / "ckpt" / "last.ckpt"

    def write(second: int) -> None:
        saver = AdapterCheckpoint(
            dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=0, save_last=True
        )
        resume = str(target) if second else None
        steps = 3 * (second + 1)
        fit(CausalLM(), tmp_path, steps, [PeftCallback(QV_LORA), saver], ckpt_path=resume)

    first_then_failing_second(write, target, monkeypatch, step)


def test_cli_export_fails_at_each_step_without_a_trace(tmp_path, monkeypatch):
    """The command line's errors are one line; the folder stays as it was."""
    from lightning_peft.lightning import cli

    monkeypatch.setattr(cli, "load_for_export", lambda config, ckpt, o: (adapted(int(ckpt)), None))
    model_class = type(tiny_llama())
    for i, step in enumerate([(model_class, "save_pretrained", 1), rename(1), rename(6)]):
        target = tmp_path / str(i) / "merged"

        def write(seed: int, t: Path = target) -> None:
            args = ["export", "--config", "c.yaml", "--ckpt", str(seed), "--merged-dir", str(t)]
            try:
                cli.main([*args, "--overwrite"] if seed else args)
            except SystemExit as exit_info:
                assert "\n" not in str(exit_info.code)
                raise OSError(str(exit_info.code)) from None

        first_then_failing_second(write, target, monkeypatch, step)
        monkeypatch.setattr(cli, "load_for_export", lambda c, k, o: (adapted(int(k)), None))


# -- killed mid-save ------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys, itertools
    sys.path.insert(0, {checkout!r})
    import torch
    from tests.tiny_models import tiny_llama
    from lightning_peft import LoRA, apply_adapters, save_peft
    from lightning_peft.checkpoint.export import merge_and_export

    models = []
    for seed in (0, 1):
        model = apply_adapters(tiny_llama(), LoRA(rank=4, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.fill_(seed + 1.0)
        models.append(model)
    print("ready", flush=True)
    for i in itertools.count():
        model = models[i % 2]
        save_peft(model, {folder!r})
        merge_and_export(model, {merged!r}, overwrite=True)
    """
)


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.45])
def test_a_writer_killed_mid_save_leaves_complete_files_only(delay, tmp_path):
    folder, merged = tmp_path / "adapter", tmp_path / "merged"
    script = WRITER.format(checkout=str(CHECKOUT), folder=str(folder), merged=str(merged))
    writer = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert writer.stdout.readline().strip() == b"ready"
    time.sleep(1.0 + delay)  # a few saves in, at different points of one
    writer.send_signal(signal.SIGKILL)
    writer.wait()

    # Every file under its own name is whole: the adapter loads and is one of the two.
    model = tiny_llama()
    load_peft(model, folder)
    values = {float(p.detach().flatten()[0]) for n, p in model.named_parameters() if "lora_B" in n}
    assert values in ({1.0}, {2.0})
    if merged.exists():
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(merged)
    # What the killed process left hidden is cleared by the next write.
    save_peft(adapted(3), folder)
    merge_and_export(adapted(3), merged, overwrite=True)
    assert not hidden_leftovers(folder) and not hidden_leftovers(merged)
    assert checkpoint_io.remove_stale_partials(folder) == 0
