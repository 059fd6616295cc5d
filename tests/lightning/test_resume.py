"""Adapter-only checkpoints resume exactly: 6 steps straight == 3 steps + resume + 3 steps."""

from __future__ import annotations

import io

import pytest
import torch
from lightning_modules import QV_LORA, CausalLM, MixinLM, fit

from lightning_peft import AdapterCheckpoint, PeftCallback, adapter_state_dict

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
