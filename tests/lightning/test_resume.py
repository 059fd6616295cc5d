"""Adapter-only checkpoints resume exactly: 6 steps straight == 3 steps + resume + 3 steps."""

from __future__ import annotations

import io

import pytest
import torch

import lightning_peft
from lightning_peft import AdapterCheckpoint, PeftCallback, adapter_state_dict
from tests.lightning_modules import QV_LORA, CausalLM, MixinLM, fit, token_data

DESIGNS = {
    "callback": (lambda **kw: CausalLM(**kw), lambda: [PeftCallback(QV_LORA)]),
    "mixin": (lambda **kw: MixinLM(**kw), lambda: []),
}


@pytest.mark.parametrize("base", ["fp32", "nf4"])
@pytest.mark.parametrize("design", DESIGNS)
def test_resume_from_an_adapter_checkpoint_continues_the_run_exactly(design, base, tmp_path):
    make_module, make_callbacks = DESIGNS[design]
    nf4 = base == "nf4"

    straight = make_module(nf4=nf4)
    reference = fit(straight, tmp_path / "a", 6, make_callbacks())

    first = make_module(nf4=nf4)
    saver = AdapterCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    fit(first, tmp_path / "b", 3, [*make_callbacks(), saver])
    ckpt = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    assert ckpt.exists()

    resumed = make_module(nf4=nf4)
    second = fit(resumed, tmp_path / "c", 6, make_callbacks(), ckpt_path=str(ckpt))

    assert second.trainer.global_step == 6
    assert second.losses == reference.losses[3:]  # bit for bit, dropout and shuffling included
    final, expected = adapter_state_dict(resumed), adapter_state_dict(straight)
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)


@pytest.mark.parametrize("design", DESIGNS)
def test_checkpoint_holds_only_adapters_and_their_optimizer_state(design, tmp_path, capsys):
    make_module, make_callbacks = DESIGNS[design]
    module = make_module()
    saver = AdapterCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    fit(module, tmp_path, 3, [*make_callbacks(), saver])
    path = tmp_path / "epoch=0-step=3.ckpt"
    checkpoint = torch.load(path, weights_only=True)  # loading runs no code from the file

    adapters = adapter_state_dict(module)
    assert set(checkpoint["state_dict"]) == set(adapters)
    assert {"optimizer_states", "lr_schedulers", "loops", "lightning_peft"} <= set(checkpoint)
    metadata = checkpoint["lightning_peft"]
    assert metadata["adapter_keys"] == list(adapters)
    assert metadata["optimizer_param_names"] == [list(adapters)]  # frozen params were dropped
    assert metadata["adapters"][0]["method"] == "LoRA" and metadata["adapters"][0]["rank"] == 4

    tensor_bytes = sum(t.numel() * t.element_size() for t in adapters.values())
    optimizer_state = checkpoint["optimizer_states"][0]["state"]
    tensor_bytes += sum(
        v.numel() * v.element_size() for state in optimizer_state.values() for v in state.values()
    )
    size = path.stat().st_size
    assert tensor_bytes <= size <= 1.01 * tensor_bytes + 64 * 1024
    full = io.BytesIO()
    torch.save({**checkpoint, "state_dict": module.state_dict()}, full)
    print(
        f"adapter checkpoint {size / 1024:.1f} KiB = tensors {tensor_bytes / 1024:.1f} KiB + "
        f"{(size - tensor_bytes) / 1024:.1f} KiB; full Lightning checkpoint "
        f"{full.getbuffer().nbytes / 1024:.1f} KiB (ratio {size / full.getbuffer().nbytes:.3f})"
    )
    assert size < full.getbuffer().nbytes / 3


# With a validation loop: every way of validating during fit, every way of attaching.
# (save every n steps, steps before the checkpoint, stateful DataLoader, Trainer options)
SCHEDULES = {
    "epoch-end-no-validation": (3, 3, False, {"limit_val_batches": 0}),
    "epoch-end-stateful-no-validation": (3, 3, True, {"limit_val_batches": 0}),
    # 3 batches an epoch: a checkpoint after step 3 is an epoch-end one, written before the
    # epoch's validation, which the resumed run then skips; both runs start with a sanity check.
    "epoch-end": (3, 3, False, {}),
    "epoch-end-stateful": (3, 3, True, {}),
    # val_check_interval=2: validation mid-epoch; the checkpoint at step 2 is mid-epoch.
    "mid-epoch-val-interval": (2, 2, True, {"val_check_interval": 2}),
    "mid-epoch-no-sanity-check": (2, 2, True, {"num_sanity_val_steps": 0}),
    # every_n_train_steps=None: ModelCheckpoint's default, a file at each validation's end.
    "saved-by-epoch-end-validation": (None, 3, False, {}),
    "saved-by-mid-epoch-validation": (None, 2, True, {"val_check_interval": 2}),
}
WAYS = {
    "callback": (CausalLM, lambda: [PeftCallback(QV_LORA)], {}),
    "mixin": (MixinLM, lambda: [], {}),
    "flag": (
        CausalLM,
        lambda: [],
        {"trainer_class": lightning_peft.Trainer, "precision": "nf4-lora"},
    ),
}


def resume_with_validation(way, base, schedule, tmp_path):
    """(the uninterrupted run's losses after the checkpoint, the resumed run's)."""
    module_class, callbacks, options = WAYS[way]
    every, first_steps, stateful, loop_options = SCHEDULES[schedule]
    nf4 = base == "nf4" and way != "flag"  # the flag quantizes the base itself

    def run(root, steps, extra_callbacks=(), ckpt_path=None):
        return fit(
            module_class(nf4=nf4),
            tmp_path / root,
            steps,
            [*callbacks(), *extra_callbacks],
            ckpt_path=ckpt_path,
            data=token_data(stateful=stateful),
            val_data=token_data(8),
            **options,
            **loop_options,
        )

    straight = run("a", 7)
    saver = AdapterCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1)
    run("b", first_steps, [saver])
    (checkpoint,) = (tmp_path / "ckpt").glob(f"*step={first_steps}.ckpt")
    resumed = run("c", 7, ckpt_path=str(checkpoint))
    assert resumed.trainer.global_step == 7
    return straight.losses[first_steps:], resumed.losses


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(
    ("way", "base"),
    [(way, base) for way in WAYS for base in ("fp32", "nf4") if (way, base) != ("flag", "fp32")],
)
def test_resume_with_a_validation_loop_continues_the_run_exactly(way, base, schedule, tmp_path):
    expected, got = resume_with_validation(way, base, schedule, tmp_path)
    assert got == expected  # bit for bit: validation draws nothing training sees


def test_a_plain_dataloader_resumed_mid_epoch_gets_one_warning_naming_the_fix(tmp_path):
    saver = AdapterCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    fit(CausalLM(), tmp_path / "a", 2, [PeftCallback(QV_LORA), saver])
    with pytest.warns(UserWarning, match="middle of an epoch.*StatefulDataLoader") as warned:
        fit(
            CausalLM(),
            tmp_path / "b",
            4,
            [PeftCallback(QV_LORA)],
            ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"),
        )
    assert sum("StatefulDataLoader" in str(w.message) for w in warned) == 1


def test_an_epoch_end_checkpoint_resumes_without_that_warning(tmp_path, recwarn):
    saver = AdapterCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    fit(CausalLM(), tmp_path / "a", 3, [PeftCallback(QV_LORA), saver])
    fit(
        CausalLM(),
        tmp_path / "b",
        4,
        [PeftCallback(QV_LORA)],
        ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt"),
    )
    assert not [w for w in recwarn if "StatefulDataLoader" in str(w.message)]
