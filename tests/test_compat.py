"""Every private name of another library the package uses lives in ``lightning_peft._compat``
and still exists on the installed versions: an upgrade that removes one fails here, by name."""

from __future__ import annotations

import ast
import inspect
from importlib import import_module
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from lightning_peft import _compat
from tests.tiny_models import tiny_llama

SRC = Path(_compat.__file__).parent


@pytest.mark.parametrize(("module", "cls", "method"), list(_compat.OVERRIDDEN))
def test_each_overridden_private_method_still_takes_the_same_arguments(module, cls, method):
    owner = getattr(import_module(module), cls)
    assert hasattr(owner, method), f"{cls}.{method} is gone"
    expected = _compat.OVERRIDDEN[(module, cls, method)]
    assert tuple(inspect.signature(getattr(owner, method)).parameters) == expected


def test_the_cli_still_writes_the_class_path_key():
    from lightning.pytorch.cli import LightningCLI

    assert f'"{_compat.CLI_CLASS_PATH_KEY}"' in inspect.getsource(LightningCLI)


def test_lightning_privates_still_exist():
    module = pl.LightningModule()
    assert _compat.attached_trainer(module) is None
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False)
    module.trainer = trainer
    assert _compat.attached_trainer(module) is trainer
    assert _compat.batches_that_stepped(trainer) == 0
    assert _compat.summary_max_depth(ModelSummary(max_depth=3)) == 3
    spawn = pl.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, logger=False)
    assert _compat.is_spawn_launcher(spawn.strategy.launcher)
    assert not _compat.is_spawn_launcher(None)
    io = AsyncCheckpointIO(TorchCheckpointIO())
    assert _compat.wraps_checkpoint_io(io) and not _compat.wraps_checkpoint_io(TorchCheckpointIO())
    inner = TorchCheckpointIO()
    _compat.rewrap_checkpoint_io(io, inner)
    assert io.checkpoint_io is inner
    assert _compat.saves_distributed_checkpoint(ModelParallelStrategy())
    assert not _compat.saves_distributed_checkpoint(
        ModelParallelStrategy(save_distributed_checkpoint=False)
    )
    assert _compat.fsdp_state_dict_type(FSDPStrategy(state_dict_type="sharded")) == "sharded"


def test_torch_privates_still_exist():
    layer = nn.Linear(2, 2, bias=False)
    assert _compat.own_names(layer) == {"weight", "bias"}  # bias held as None
    assert _compat.own_parameter(layer, "weight") is layer.weight
    shared = nn.Linear(2, 2)
    holder = nn.Module()
    holder.a, holder.b = shared, shared
    assert list(_compat.own_children(holder)) == ["a", "b"]  # named_children says "a" only
    keys = _compat.no_incompatible_keys()
    assert keys.missing_keys == [] and keys.unexpected_keys == []
    parameter = nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    _compat.track_step_for_schedulers(optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    optimizer.step()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        scheduler.step()  # no "scheduler before optimizer" warning: the flag was set
    assert optimizer._opt_called  # what LRScheduler.step reads


def test_transformers_bitsandbytes_and_litserve_privates_still_exist():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(d_model=8, d_ff=16, num_layers=1, num_heads=2))
    assert "wo" in _compat.keep_in_fp32_modules(t5)
    assert _compat.keep_in_fp32_modules(tiny_llama()) == ()
    inverse = import_module("bitsandbytes.functional")._convert_weight_packed_for_cpu_inverse
    assert list(inspect.signature(inverse).parameters)[:2] == ["packed_weight", "quant_state"]
    pack = import_module("bitsandbytes.functional")._convert_weight_packed_for_cpu
    assert list(inspect.signature(pack).parameters)[:2] == ["qweight", "quant_state"]
    handler = import_module("litserve.server").RegularRequestHandler
    assert list(inspect.signature(handler.handle_request).parameters)[1:] == [
        "request",
        "request_type",
    ]


def test_a_missing_private_name_is_named_with_the_library_and_its_version():
    with pytest.raises(_compat.MissingPrivateAPI, match=r"torch's private '_gone', which torch 2"):
        _compat._private(torch, "_gone", "torch")


def _own_private_names() -> set[str]:
    """Every underscore name the package itself defines (functions, classes, module
    globals, attributes it assigns, parameters)."""
    names: set[str] = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return {n for n in names if n.startswith("_")}


def _private_uses(path: Path, own: set[str], root: Path = SRC) -> list[str]:
    overridden = {method for _, _, method in _compat.OVERRIDDEN}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        name = None
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.partition(".")[0] not in ("lightning_peft", "__future__"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private or any(part.startswith("_") for part in node.module.split(".")):
                    name = f"from {node.module} import {', '.join(a.name for a in node.names)}"
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            if not node.attr.startswith("__") and node.attr not in own | overridden:
                name = node.attr
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in (
            "getattr",
            "hasattr",
            "setattr",
        ):
            literal = node.args[1] if len(node.args) > 1 else None
            if isinstance(literal, ast.Constant) and str(literal.value).startswith("_"):
                if not str(literal.value).startswith("__") and literal.value not in own:
                    name = f"getattr(..., {literal.value!r})"
        if name:
            found.append(f"{path.relative_to(root)}:{node.lineno}: {name}")
    return found


def test_no_private_name_of_another_library_is_used_outside_compat():
    own = _own_private_names()
    uses = [
        use
        for path in sorted(SRC.rglob("*.py"))
        if path.name != "_compat.py"
        for use in _private_uses(path, own)
    ]
    assert not uses, "private names used outside lightning_peft/_compat.py:\n" + "\n".join(uses)


def test_the_scan_finds_a_private_name(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from lightning.fabric.utilities.cloud_io import _is_local_file_protocol\n"
        "def f(trainer):\n"
        "    return trainer.fit_loop._restarting, getattr(trainer, '_accelerator_connector')\n"
    )
    found = _private_uses(sample, set(), root=tmp_path)
    assert [line.split(": ", 1)[1] for line in found] == [
        "from lightning.fabric.utilities.cloud_io import _is_local_file_protocol",
        "_restarting",
        "getattr(..., '_accelerator_connector')",
    ]
