"""Writers never delete or move what they did not write, and a failure leaves things as
they were: merge_and_export, save_peft, lightning-peft export."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_peft import LoRA, apply_adapters, load_peft, save_peft
from lightning_peft.checkpoint.export import merge_and_export
from lightning_peft.lightning.cli import main as cli_main
from tests.snapshots import (
    assert_folder_unchanged,
    assert_model_unchanged,
    folder_snapshot,
    model_snapshot,
)
from tests.tiny_models import VOCAB, tiny_llama
from tests.tiny_models import adapted_llama as adapted


@pytest.fixture
def users_folder(tmp_path):
    """A folder holding a user's own files: a tokenizer, notes, a runs/ folder."""
    folder = tmp_path / "mine"
    (folder / "runs").mkdir(parents=True)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "notes.txt").write_text("keep me")
    (folder / "runs" / "epoch=0-step=3.ckpt").write_bytes(b"a checkpoint")
    return folder


def test_merge_and_export_refuses_a_folder_holding_other_files(users_folder):
    model = adapted()
    before_model, before_disk = model_snapshot(model), folder_snapshot(users_folder)
    with pytest.raises(
        FileExistsError,
        match=r"mine is not empty \(it holds notes.txt, runs, "
        r"tokenizer.json\).*overwrite=True",
    ):
        merge_and_export(model, users_folder)
    assert_model_unchanged(model, before_model)
    assert_folder_unchanged(users_folder, before_disk)


def test_merge_and_export_refuses_a_file_as_its_folder(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"precious")
    before = folder_snapshot(target)
    with pytest.raises(FileExistsError, match=r"model\.bin is a file, not a folder"):
        merge_and_export(adapted(), target)
    assert_folder_unchanged(target, before)  # not moved aside, no hidden sibling either


def test_overwrite_replaces_only_the_exports_own_files(users_folder):
    # An earlier, sharded export of another model in the same folder: its shards must go.
    (users_folder / "config.json").write_text("{}")
    (users_folder / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    (users_folder / "model.safetensors.index.json").write_text("{}")
    model = adapted()
    tokens = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=tokens).logits

    merge_and_export(model, users_folder, overwrite=True)

    names = sorted(p.name for p in users_folder.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "notes.txt",
        "runs",
        "tokenizer.json",
    ]
    assert (users_folder / "notes.txt").read_text() == "keep me"
    assert (users_folder / "runs" / "epoch=0-step=3.ckpt").read_bytes() == b"a checkpoint"
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(users_folder)(input_ids=tokens).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert not [p for p in users_folder.parent.iterdir() if p.name.startswith(".")]


def test_a_failing_export_leaves_the_previous_one_as_it_was(tmp_path, monkeypatch):
    target = tmp_path / "merged"
    merge_and_export(adapted(0), target)
    before = folder_snapshot(target)

    def save_half_then_fail(self, directory, **kwargs):
        (directory / "config.json").write_text("{half")
        raise OSError("disk full")

    monkeypatch.setattr(type(tiny_llama()), "save_pretrained", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        merge_and_export(adapted(1), target, overwrite=True)
    assert_folder_unchanged(target, before)


def test_save_peft_keeps_other_files_and_a_failure_keeps_the_previous_adapter(
    users_folder, monkeypatch
):
    save_peft(adapted(0), users_folder)
    assert (users_folder / "tokenizer.json").read_text() == '{"version": "1.0"}'
    before = folder_snapshot(users_folder)

    def fail(*args, **kwargs):
        raise OSError("disk full while writing adapter_config.json")

    monkeypatch.setattr(json, "dumps", fail)  # weights written, config fails
    with pytest.raises(OSError, match="disk full"):
        save_peft(adapted(1), users_folder)
    monkeypatch.undo()
    assert_folder_unchanged(users_folder, before)
    fresh = apply_adapters(tiny_llama(), LoRA(rank=4, target_modules=["q_proj", "v_proj"]))
    load_peft(fresh, users_folder)  # the folder still loads: the first adapter, whole
    expected = adapted(0).state_dict()
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_cli_export_refuses_the_checkpoints_own_folder_before_any_work(tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "epoch=0-step=80.ckpt").write_bytes(b"the only copy")
    (folder / "last.ckpt").write_bytes(b"another")
    before = folder_snapshot(folder)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            [
                "export",
                "--config",
                "does-not-matter.yaml",
                "--ckpt",
                str(folder / "epoch=0-step=80.ckpt"),
                "--merged-dir",
                str(folder),
            ]
        )
    message = str(exit_info.value.code)
    assert message.startswith("lightning-peft export: ") and "\n" not in message
    assert "is not empty" in message and "epoch=0-step=80.ckpt" in message
    assert_folder_unchanged(folder, before)
