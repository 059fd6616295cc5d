"""Checkpoints that do not fit are refused with a clear message before training starts."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft import (
    AdapterCheckpoint,
    AdapterConfigError,
    AdapterStateError,
    LoRA,
    PeftCallback,
)
from lightning_peft.errors import AdapterStateKeyError
from tests.lightning_modules import QV_LORA, CausalLM, MixinLM, fit, token_data


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter checkpoint after 3 steps: q/v LoRA rank 4 on base seed 0."""
    root = tmp_path_factory.mktemp("saved")
    saver = AdapterCheckpoint(dirpath=root, filename="adapter", every_n_train_steps=3)
    fit(CausalLM(), root, 3, [PeftCallback(QV_LORA), saver])
    return root / "adapter.ckpt"


def resume(
    tmp_path: Path,
    checkpoint: Path,
    module: L.LightningModule | None = None,
    adapters: LoRA = QV_LORA,
):
    module = module or CausalLM()
    return fit(module, tmp_path, 6, [PeftCallback(adapters)], ckpt_path=str(checkpoint))


def assert_refused_before_training(tmp_path, checkpoint, error, match, **kwargs):
    module = kwargs.pop("module", None) or CausalLM()
    frozen = {k: v.clone() for k, v in module.state_dict().items()}
    recorder_holder = {}
    with pytest.raises(error, match=match):
        recorder_holder["r"] = resume(tmp_path, checkpoint, module=module, **kwargs)
    assert "r" not in recorder_holder
    assert not list(tmp_path.rglob("*.ckpt")), "nothing may be written by a refused resume"
    state = module.state_dict()  # the base's tensors, under the same names with adapters on
    assert all(torch.equal(state[k], v) for k, v in frozen.items()), "frozen tensors changed"


def test_other_target_modules_are_refused(tmp_path, checkpoint):
    assert_refused_before_training(
        tmp_path,
        checkpoint,
        AdapterStateKeyError,
        r"(?s)missing from the state dict \(4\): "
        r"model\.model\.layers\.0\.self_attn\.o_proj.*not adapters of this model \(4\)",
        adapters=LoRA(rank=4, target_modules=["q_proj", "o_proj"]),
    )


def test_another_rank_is_refused(tmp_path, checkpoint):
    assert_refused_before_training(
        tmp_path,
        checkpoint,
        AdapterStateError,
        r"checkpoint \(4, 64\), model \(8, 64\)",
        adapters=LoRA(rank=8, target_modules=["q_proj", "v_proj"]),
    )


def test_another_base_model_is_refused(tmp_path, checkpoint):
    assert_refused_before_training(
        tmp_path,
        checkpoint,
        AdapterStateError,
        r"adapter\.ckpt' was trained on a different base model",
        module=CausalLM(base_seed=1),
    )


def test_another_optimizer_parameter_order_is_refused(tmp_path, checkpoint):
    assert_refused_before_training(
        tmp_path,
        checkpoint,
        AdapterStateError,
        r"(?s)holds optimizer state for other parameters \(optimizer 0 has 8 parameters in the "
        r"checkpoint "
        r"and 8 now; at position 0 the checkpoint has "
        r"'model\.model\.layers\.0\.self_attn\.q_proj\.lora_A.*"
        r"the run has 'model\.model\.layers\.1\.self_attn\.v_proj\.lora_B",
        module=CausalLM(reverse_optimizer=True),
    )


def test_a_checkpoint_without_adapter_metadata_is_refused(tmp_path):
    plain_dir = tmp_path / "plain"
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=plain_dir, filename="full")],
        accelerator="cpu",
    )
    trainer.fit(CausalLM(), token_data())
    module = CausalLM()
    frozen = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(
        AdapterStateError, match=r"full\.ckpt' is not a lightning_peft adapter checkpoint"
    ):
        resume(tmp_path / "run", plain_dir / "full.ckpt", module=module)
    # Refused before Lightning copied the file's 21 frozen tensors into the module.
    state = module.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items() if k in state)


def test_mixin_refuses_a_mismatch_before_copying_anything(tmp_path, checkpoint):
    module = MixinLM(adapters=LoRA(rank=8, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(AdapterStateError, match=r"checkpoint \(4, 64\), model \(8, 64\)"):
        fit(module, tmp_path, 6, [], ckpt_path=str(checkpoint))


def test_strategies_that_write_sharded_folders_are_refused_with_the_fix():
    """Lightning reloads sharded folders by matching every tensor of the model, frozen base
    included: adapter-only folders would not load. (FSDP1 needs a GPU to reach a Trainer.)"""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from lightning_peft.lightning.checkpoint_io import make_checkpoints_adapter_only

    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=ModelParallelStrategy())
    with pytest.raises(
        AdapterConfigError,
        match=r"ModelParallelStrategy\(save_distributed_checkpoint=True\) writes sharded "
        r"checkpoint folders.*use lightning_peft\.AdapterModelParallelStrategy",
    ):
        make_checkpoints_adapter_only(trainer)
    fsdp = SimpleNamespace(strategy=FSDPStrategy(state_dict_type="sharded"))
    with pytest.raises(AdapterConfigError, match=r"pass state_dict_type='full'"):
        make_checkpoints_adapter_only(fsdp)
    one_file = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=ModelParallelStrategy(save_distributed_checkpoint=False),
    )
    make_checkpoints_adapter_only(one_file)  # one file: reduced on every rank, then written


def test_deepspeed_is_refused_naming_the_alternatives():
    """DeepSpeed needs its package (and a GPU) to build: the refusal is checked on an
    instance that skipped its __init__, which is all the check reads."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_peft.lightning.checkpoint_io import make_checkpoints_adapter_only

    trainer = SimpleNamespace(strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy))
    with pytest.raises(
        AdapterConfigError, match=r"DeepSpeedStrategy: DeepSpeed's engine writes .* strategy='ddp'"
    ):
        make_checkpoints_adapter_only(trainer)


def test_peft_callback_refuses_what_is_not_an_adapter_config():
    with pytest.raises(
        AdapterConfigError,
        match=r"PeftCallback needs adapter configs such as LoRA\(\.\.\.\), IA3\(\) or "
        r"BitFit\(\), got .lora.",
    ):
        PeftCallback("lora")  # type: ignore[arg-type]


def test_an_optimizer_over_frozen_parameters_only_is_refused(tmp_path):
    class HeadOnly(CausalLM):
        def configure_optimizers(self):
            return torch.optim.SGD(self.model.lm_head.parameters(), lr=0.1)

    with pytest.raises(
        AdapterStateError,
        match=r"configure_optimizers returned optimizers with no trainable parameter",
    ):
        fit(HeadOnly(), tmp_path, 1, [PeftCallback(QV_LORA)])


def test_adapter_fsdp2_strategy_refuses_sharded_checkpoint_folders():
    from lightning_peft import AdapterModelParallelStrategy

    with pytest.raises(ValueError, match=r"save_distributed_checkpoint=True .* is not supported"):
        AdapterModelParallelStrategy(save_distributed_checkpoint=True)


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_truncated_or_empty_checkpoint_is_named_as_such(damage, tmp_path, checkpoint):
    broken = tmp_path / "broken.ckpt"
    data = checkpoint.read_bytes()
    broken.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    for module, callbacks in ((CausalLM(), [PeftCallback(QV_LORA)]), (MixinLM(), [])):
        with pytest.raises(AdapterStateError, match=r"broken\.ckpt' is truncated or damaged"):
            fit(module, tmp_path / "run", 6, callbacks, ckpt_path=str(broken))


def test_other_targets_through_load_from_checkpoint_are_named_not_called_another_base(
    tmp_path, checkpoint
):
    """The mixin checks metadata before the state dict: other targets change what the
    fingerprint sees as frozen, so they must be named as such first."""
    saver = AdapterCheckpoint(dirpath=tmp_path, filename="mixin", every_n_train_steps=3)
    fit(MixinLM(), tmp_path, 3, [saver])
    with pytest.raises(AdapterStateKeyError, match=r"(?s)missing from the state dict.*o_proj"):
        MixinLM.load_from_checkpoint(
            tmp_path / "mixin.ckpt", adapters=LoRA(rank=4, target_modules=["q_proj", "o_proj"])
        )


def test_damaged_metadata_is_named_not_a_key_error(tmp_path, checkpoint):
    data = torch.load(checkpoint, weights_only=True)
    del data["lightning_peft"]["base_fingerprint"]
    data["lightning_peft"]["adapter_keys"] = "not a list"
    torch.save(data, tmp_path / "edited.ckpt")
    with pytest.raises(
        AdapterStateError,
        match=r"edited\.ckpt' has damaged adapter metadata: adapter_keys, base_fingerprint",
    ):
        resume(tmp_path / "run", tmp_path / "edited.ckpt")
