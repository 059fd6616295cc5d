"""Adapter checkpoint files: atomic writes, safe loading, load_from_checkpoint, summaries."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_peft import (
    AdapterCheckpoint,
    PeftCallback,
    PeftPrecision,
    adapter_state_dict,
    count_parameters,
)
from lightning_peft.lightning import PeftModelSummary
from lightning_peft.lightning.summary import PeftRichModelSummary
from tests.lightning_modules import QV_LORA, CausalLM, MixinLM, fit, quantize_decoder
from tests.tiny_models import logits


def test_an_interrupted_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    saver = AdapterCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=0, save_last=True
    )
    fit(CausalLM(), tmp_path, 3, [PeftCallback(QV_LORA), saver])
    last = tmp_path / "ckpt" / "last.ckpt"
    before = last.read_bytes()

    def write_half_then_fail(self, checkpoint, path, storage_options=None):
        with open(path, "wb") as file:
            file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", write_half_then_fail)
    saver = AdapterCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=0, save_last=True
    )
    with pytest.raises(OSError, match="disk full"):
        fit(CausalLM(), tmp_path, 6, [PeftCallback(QV_LORA), saver], ckpt_path=str(last))
    assert last.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]


def test_checkpoints_written_in_the_background_are_complete_and_resume(tmp_path):
    """Lightning's AsyncCheckpointIO writes in a thread: the rename must follow the write."""
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    saver = AdapterCheckpoint(
        dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=3, save_top_k=-1
    )
    straight = fit(CausalLM(), tmp_path / "a", 9, [PeftCallback(QV_LORA)])
    fit(
        CausalLM(),
        tmp_path / "b",
        6,
        [PeftCallback(QV_LORA), saver],
        plugins=[AsyncCheckpointIO()],
    )
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["step=3.ckpt", "step=6.ckpt"]  # no .partial left behind
    for name in files:
        assert torch.load(tmp_path / "ckpt" / name, weights_only=True)["lightning_peft"]
    resumed = fit(
        CausalLM(),
        tmp_path / "c",
        9,
        [PeftCallback(QV_LORA)],
        ckpt_path=str(tmp_path / "ckpt" / "step=6.ckpt"),
        plugins=[AsyncCheckpointIO()],
    )
    assert resumed.losses == straight.losses[6:]


def test_resume_works_with_weights_only_loading(tmp_path):
    saver = AdapterCheckpoint(dirpath=tmp_path, filename="adapter", every_n_train_steps=3)
    fit(CausalLM(), tmp_path, 3, [PeftCallback(QV_LORA), saver])
    run = fit(
        CausalLM(),
        tmp_path,
        4,
        [PeftCallback(QV_LORA)],
        ckpt_path=str(tmp_path / "adapter.ckpt"),
        weights_only=True,
    )
    assert run.trainer.global_step == 4


def test_mixin_module_loads_from_an_adapter_checkpoint(tmp_path, input_ids):
    trained = MixinLM()
    saver = AdapterCheckpoint(dirpath=tmp_path, filename="adapter", every_n_train_steps=3)
    fit(trained, tmp_path, 3, [saver])

    loaded = MixinLM.load_from_checkpoint(tmp_path / "adapter.ckpt")
    expected = adapter_state_dict(trained)
    assert all(torch.equal(adapter_state_dict(loaded)[k], v) for k, v in expected.items())
    trained.eval(), loaded.eval()
    assert torch.equal(logits(loaded.model, input_ids), logits(trained.model, input_ids))


@pytest.mark.parametrize("entry", ["callback", "mixin", "precision"])
def test_weights_only_saves_hold_the_adapters_alone(tmp_path, entry, input_ids):
    """Lightning calls neither the callbacks' nor the precision plugin's on_save_checkpoint
    for weights-only saves; the files must be adapter-only all the same, for each way in."""
    saver = ModelCheckpoint(dirpath=tmp_path, filename="weights", save_weights_only=True)
    module, callbacks, plugins = {
        "callback": (CausalLM(), [PeftCallback(QV_LORA)], []),
        "mixin": (MixinLM(), [], []),
        "precision": (CausalLM(), [], [PeftPrecision("nf4-lora", adapters=QV_LORA)]),
    }[entry]
    run = fit(module, tmp_path, 2, [*callbacks, saver], plugins=plugins)
    run.trainer.save_checkpoint(tmp_path / "direct.ckpt", weights_only=True)
    expected = adapter_state_dict(module)
    assert len(expected) == 8  # LoRA A and B on q and v of two layers
    for name in ("weights.ckpt", "direct.ckpt"):
        saved = torch.load(tmp_path / name, weights_only=True)
        assert "optimizer_states" not in saved  # a weights-only file, as asked
        assert saved["lightning_peft"]["adapter_keys"] == list(expected)
        assert saved["state_dict"].keys() == expected.keys()
        assert all(torch.equal(saved["state_dict"][k], v) for k, v in expected.items())
    if entry == "mixin":
        loaded = MixinLM.load_from_checkpoint(tmp_path / "weights.ckpt")
        module.eval(), loaded.eval()
        assert torch.equal(logits(loaded.model, input_ids), logits(module.model, input_ids))


class StateDictSizes(Callback):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.sizes.append(len(checkpoint["state_dict"]))


class MixinSeeingTheWholeState(MixinLM):
    def on_save_checkpoint(self, checkpoint) -> None:
        super().on_save_checkpoint(checkpoint)
        self.sizes = [*getattr(self, "sizes", []), len(checkpoint["state_dict"])]


@pytest.mark.parametrize("entry", ["callback", "mixin"])
def test_hooks_see_the_whole_state_and_the_file_holds_the_adapters(tmp_path, entry):
    """The checkpoint is reduced after every hook ran (in the strategy's save), so users'
    own on_save_checkpoint read what Lightning gave them; the file is adapter-only."""
    sizes = StateDictSizes()
    module = MixinSeeingTheWholeState() if entry == "mixin" else CausalLM()
    adapters = [] if entry == "mixin" else [PeftCallback(QV_LORA)]
    saver = AdapterCheckpoint(dirpath=tmp_path, filename="adapter", every_n_train_steps=2)
    fit(module, tmp_path, 2, [*adapters, sizes, saver])
    whole = len(module.state_dict())
    assert sizes.sizes == [whole] and whole > 8
    if entry == "mixin":
        assert module.sizes == [whole]
    saved = torch.load(tmp_path / "adapter.ckpt", weights_only=True)
    assert len(saved["state_dict"]) == 8


def test_only_trainable_parameters_reach_the_optimizer(tmp_path):
    module = CausalLM()
    run = fit(module, tmp_path, 1, [PeftCallback(QV_LORA)])
    params = [p for group in run.trainer.optimizers[0].param_groups for p in group["params"]]
    assert len(params) == 8 and all(p.requires_grad for p in params)
    assert count_parameters(module).trainable == sum(p.numel() for p in params) == 1792


def test_model_summary_counts_4bit_weights_as_their_real_size(tmp_path):
    module = CausalLM(nf4=True)
    run = fit(module, tmp_path, 1, [PeftCallback(QV_LORA)], enable_model_summary=True)
    summaries = [
        cb
        for cb in run.trainer.callbacks
        if isinstance(cb, (PeftModelSummary, PeftRichModelSummary))
    ]
    assert len(summaries) == 1  # swapped in for Lightning's default ModelSummary
    summary = summaries[0]._summary(run.trainer, module)
    count = count_parameters(module)
    assert (
        summary.total_parameters
        == count.total
        == sum(p.numel() for p in CausalLM().parameters()) + 1792
    )
    assert summary.trainable_parameters == count.trainable == 1792
    plain = L.pytorch.utilities.model_summary.summarize(module)
    assert plain.total_parameters < count.total  # what Lightning alone would have printed


def test_mixin_counts_and_keeps_working_over_an_nf4_base(tmp_path):
    module = MixinLM()
    quantize_decoder(module.model)
    fit(module, tmp_path, 2, [])
    assert count_parameters(module).trainable == 1792


def test_export_peft_writes_a_peft_folder_beside_each_kept_checkpoint(tmp_path):
    from peft import PeftModel

    from tests.tiny_models import tiny_llama

    saver = AdapterCheckpoint(
        dirpath=tmp_path,
        every_n_train_steps=2,
        save_top_k=1,
        monitor="step",
        mode="max",
        export_peft=True,
        base_model_name_or_path="tiny-llama",
    )
    module = CausalLM()
    fit(module, tmp_path, 6, [PeftCallback(QV_LORA), saver])
    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert folders == ["epoch=1-step=6-peft"]  # the removed checkpoints took theirs along
    assert (tmp_path / "epoch=1-step=6.ckpt").exists()

    theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path / "epoch=1-step=6-peft")
    tokens = torch.randint(0, 256, (2, 8))
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(input_ids=tokens).logits, module.model(input_ids=tokens).logits
        )
