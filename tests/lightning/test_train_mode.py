"""The adapted model trains in train mode and validates in eval mode, whatever mode the
module built it in (``from_pretrained`` returns eval-mode models; Lightning keeps modes)."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch

from lightning_peft import LoRA, PeftCallback, PeftMixin
from tests.lightning_modules import fit, token_data
from tests.tiny_models import tiny_llama

QV = LoRA(rank=4, dropout=0.1, target_modules=["q_proj", "v_proj"])


class ModeRecorder(L.LightningModule):
    """Knows nothing of adapters; its model comes in eval mode, as from_pretrained gives it."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama().eval()
        self.modes: dict[str, set[bool]] = {"train": set(), "val": set()}

    def _record(self, stage: str) -> None:
        lora = self.model.model.layers[0].self_attn.q_proj.lora_A["default"]
        self.modes[stage] |= {self.model.training, lora.training}

    def training_step(self, batch, batch_idx):
        self._record("train")
        return self.model(input_ids=batch, labels=batch).loss

    def validation_step(self, batch, batch_idx):
        self._record("val")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class MixinModeRecorder(PeftMixin, ModeRecorder):
    def configure_adapters(self):
        return QV


@pytest.mark.parametrize("design", ["callback", "mixin"])
def test_the_adapted_model_trains_in_train_mode_and_validates_in_eval_mode(design, tmp_path):
    module = ModeRecorder() if design == "callback" else MixinModeRecorder()
    callbacks = [PeftCallback(QV)] if design == "callback" else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(module, tmp_path, 3, callbacks, val_data=token_data(4))
    assert module.modes == {"train": {True}, "val": {False}}
    # in train mode before Lightning counts eval-mode modules at the start of training
    assert not [w for w in caught if "in eval mode" in str(w.message)]


def test_train_mode_false_leaves_the_modules_modes_alone(tmp_path):
    module = ModeRecorder()
    fit(module, tmp_path, 2, [PeftCallback(QV, train_mode=False)])
    assert module.modes["train"] == {False}  # the module's own choice, adapters following it


def test_adapters_attached_to_an_eval_mode_model_are_in_eval_mode():
    from lightning_peft import PromptTuning, apply_adapters

    model = apply_adapters(tiny_llama().eval(), [QV, PromptTuning(num_virtual_tokens=2)])
    assert not any(m.training for m in model.modules())  # no LoRA dropout at inference
    model = apply_adapters(tiny_llama().train(), QV)
    assert all(m.training for m in model.modules())


class CallCounter(ModeRecorder):
    """Counts calls of decoder layer 0's attention: checkpointing runs the layer again in
    backward, as far as the adapters' saved tensors need (transformers 5 checkpoints the
    layer's ``forward``, inside its own hooks, so the count is taken on a submodule)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.model.model.layers[0].self_attn.register_forward_hook(lambda *args: self._count())

    def _count(self) -> None:
        self.calls += 1


class MixinCallCounter(PeftMixin, CallCounter):
    adapter_gradient_checkpointing = True

    def configure_adapters(self):
        return QV


@pytest.mark.parametrize("way", ["off", "callback", "plugin", "mixin"])
def test_gradient_checkpointing_recomputes_layers_in_backward(way, tmp_path):
    from lightning_peft import PeftPrecision

    module = MixinCallCounter() if way == "mixin" else CallCounter()
    callbacks = {
        "off": [PeftCallback(QV)],
        "callback": [PeftCallback(QV, gradient_checkpointing=True)],
        "plugin": [PeftCallback(QV)],
        "mixin": [],
    }[way]
    options = {"plugins": [PeftPrecision("nf4-lora", gradient_checkpointing=True)]}
    run = fit(module, tmp_path, 2, callbacks, **(options if way == "plugin" else {}))
    assert run.trainer.global_step == 2
    assert module.calls == (2 if way == "off" else 4)  # once a step, twice when recomputed
    assert module.model.config.use_cache is (way == "off")
