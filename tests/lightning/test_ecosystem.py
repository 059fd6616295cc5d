"""What users combine the package with in Lightning, row by row, two ways each: the float LoRA
callback (``PeftCallback``) and the flag (``lightning_peft.Trainer(precision="nf4-lora")``).

Every row that works asserts it trains, writes adapter-only files, leaves the frozen (or
4-bit) base untouched, and resumes bit for bit; a row that cannot work is refused when
training is set up, with the reason and the alternative. docs/lightning.md's compatibility table is
:func:`ecosystem_table` of :data:`ROWS` (``python -m tests.lightning.test_ecosystem``
prints it; ``test_guide_table_is_this_matrix`` keeps them equal).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    BatchSizeFinder,
    Callback,
    EarlyStopping,
    EMAWeightAveraging,
    LearningRateFinder,
    LearningRateMonitor,
    ModelPruning,
    ModelSummary,
    StochasticWeightAveraging,
)
from torch.utils.data import DataLoader

import lightning_peft
from lightning_peft import AdapterCheckpoint, AdapterConfigError, PeftCallback
from lightning_peft.counting import count_parameters
from lightning_peft.injection import adapter_parameter_names
from lightning_peft.lightning import AdapterWeightAveraging
from tests.lightning_modules import QV_LORA, CausalLM, MixinLM, fit, token_data

# The float callback touches no 4-bit layer: the runs that force each bitsandbytes CPU path
# (make test-cpu-paths) skip it.
WAYS = (pytest.param("callback", marks=pytest.mark.float_base), "nf4-lora")
WAY_NAMES = ("callback", "nf4-lora")
GUIDE = Path(__file__).parents[2] / "docs" / "lightning.md"

# Row id -> (what the guide calls it, {way: "✓" or what the refusal says}).
ROWS: dict[str, tuple[str, dict[str, str]]] = {
    "accumulate-clip-monitor": (
        "`accumulate_grad_batches`, `gradient_clip_val`, `LearningRateMonitor`, CSV logger",
        {},
    ),
    "sequential-lr": ("`SequentialLR` (`LinearLR` warm-up, then `CosineAnnealingLR`)", {}),
    "one-cycle-lr": ("`OneCycleLR`", {}),
    "sgd": (
        "`SGD(momentum, nesterov)` and named param groups",
        {"nf4-lora": "✓ (kept as SGD: only Adam/AdamW become 8-bit; one info line)"},
    ),
    "epochs": ("`max_epochs`, validation and checkpoints every epoch, `EarlyStopping`", {}),
    "weight-averaging": ("`AdapterWeightAveraging` (EMA or SWA's mean, adapters only)", {}),
    "lightning-averaging": (
        "Lightning's `EMAWeightAveraging`, `StochasticWeightAveraging`",
        {
            way: "refused: they average the frozen base; use `AdapterWeightAveraging`"
            for way in WAY_NAMES
        },
    ),
    "tuners": ("`LearningRateFinder`, `BatchSizeFinder`", {}),
    "finetuning-pruning": (
        "`BackboneFinetuning`, `ModelPruning`",
        {way: "refused: they train or rewrite the frozen base" for way in WAY_NAMES},
    ),
    "16-bit": ('`precision="bf16-true"` / `"nf4-lora-bf16-mixed"`', {}),
    "hyperparameters": ("`save_hyperparameters()` of a `LoRA(...)`, resumed `weights_only`", {}),
    "summary": ("a `ModelSummary` subclass of the user's (4-bit weights counted whole)", {}),
    "load-from-checkpoint": (
        "loading a trained module from its checkpoint",
        {
            way: "✓ `load_adapter_checkpoint(LM, path)` (`LM.load_from_checkpoint` drops the "
            "adapters of a module that does not attach them itself; `PeftMixin` modules: ✓)"
            for way in WAY_NAMES
        },
    ),
    "ddp-spawn": (
        '`strategy="ddp_spawn"`',
        {
            "callback": "✓ (adapters stay in the workers: read an `AdapterCheckpoint`)",
            "nf4-lora": '✓ with `PeftMixin`; with the callback refused: use `strategy="ddp"`',
        },
    ),
}


def ecosystem_table() -> str:
    lines = ['| combined with | float LoRA callback | `precision="nf4-lora"` |', "|---|---|---|"]
    for what, cells in ROWS.values():
        lines.append(f"| {what} | {cells.get('callback', '✓')} | {cells.get('nf4-lora', '✓')} |")
    return "\n".join(lines)


def test_guide_table_is_this_matrix():
    assert ecosystem_table() in GUIDE.read_text(encoding="utf-8")


# --- running a row ------------------------------------------------------------------------


class Recorder(Callback):
    """Per step: the loss, the learning rate, the batch; and the frozen tensors checked
    unchanged from the start of training to its end."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.lrs: list[float] = []

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.frozen = frozen_tensors(module)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        now = frozen_tensors(module)
        assert now.keys() == self.frozen.keys() and now
        changed = [k for k in now if not torch.equal(now[k], self.frozen[k])]
        assert not changed, f"frozen tensors changed in training: {changed[:3]}"


def frozen_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    adapters = set(adapter_parameter_names(module))
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k not in adapters}


def way_options(way: str) -> tuple[list[Callback], dict[str, Any]]:
    if way == "callback":
        return [PeftCallback(QV_LORA)], {}
    return [], {"trainer_class": lightning_peft.Trainer, "precision": "nf4-lora"}


def run(way: str, module: L.LightningModule, root: Path, steps: int, callbacks=(), **options):
    way_callbacks, way_kwargs = way_options(way)
    recorder = Recorder()
    result = fit(
        module,
        root,
        steps,
        [*way_callbacks, *callbacks, recorder],
        **{"data": token_data(8), **way_kwargs, **options},
    )
    recorder.trainer = result.trainer
    return recorder


def train_and_resume(
    way: str,
    make_module,
    tmp_path: Path,
    *,
    steps: int = 4,
    save_at: int = 2,
    callbacks=lambda: [],
    saver: dict[str, Any] | None = None,
    **options: Any,
) -> tuple[Recorder, Recorder, Path]:
    """The straight run, the resumed one, and the checkpoint between them, asserting what
    every working row must: training moved the loss, the file is adapter-only, the resumed
    run continues the straight one exactly (losses, learning rates, final adapters)."""
    straight_module = make_module()
    straight = run(way, straight_module, tmp_path / "a", steps, callbacks(), **options)
    assert straight.losses and all(loss == loss for loss in straight.losses)  # no NaN

    # Epoch-based rows stop the first run after the epochs up to the checkpoint (2 batches
    # an epoch); step-based ones at its step.
    first_options = dict(options)
    if "max_epochs" in options:
        first_options["max_epochs"] = save_at // 2
    checkpoints = tmp_path / "checkpoints"
    save = AdapterCheckpoint(
        dirpath=checkpoints, save_top_k=-1, **(saver or {"every_n_train_steps": save_at})
    )
    first_module = make_module()
    first_steps = -1 if "max_epochs" in options else save_at
    run(way, first_module, tmp_path / "b", first_steps, [*callbacks(), save], **first_options)
    (checkpoint,) = checkpoints.glob(f"*step={save_at}.ckpt")
    saved = torch.load(checkpoint, weights_only=True)
    assert sorted(saved["state_dict"]) == sorted(adapter_parameter_names(first_module))

    resumed_module = make_module()
    resumed = run(
        way,
        resumed_module,
        tmp_path / "c",
        steps,
        callbacks(),
        ckpt_path=str(checkpoint),
        **options,
    )
    seen = len(straight.losses) - len(resumed.losses)
    assert resumed.losses == straight.losses[seen:] and resumed.losses
    assert resumed.lrs == straight.lrs[seen:]
    final, expected = resumed_module.state_dict(), straight_module.state_dict()
    for key in adapter_parameter_names(straight_module):
        assert torch.equal(final[key], expected[key]), key
    return straight, resumed, checkpoint


def expected_lrs(make_scheduler, steps: int) -> list[float]:
    """The learning rates torch's own scheduler gives, step by step, on a plain optimizer."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


# --- the rows -----------------------------------------------------------------------------


class Scheduled(CausalLM):
    """AdamW(lr=0.1) stepped by ``make_scheduler(optimizer)`` every step."""

    def __init__(self, make_scheduler, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.make_scheduler = make_scheduler

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.1)
        scheduler = self.make_scheduler(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def warmup_then_cosine(optimizer):
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, 0.1, 1.0, total_iters=2)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 4)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[2])


def one_cycle(optimizer):
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=8)


@pytest.mark.parametrize("way", WAYS)
def test_accumulate_clip_monitor(way, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    straight, _, _ = train_and_resume(
        way,
        CausalLM,
        tmp_path,
        steps=2,
        save_at=1,
        accumulate_grad_batches=2,
        gradient_clip_val=0.5,
        callbacks=lambda: [LearningRateMonitor("step")],
        logger=CSVLogger(tmp_path / "logs"),
        log_every_n_steps=1,
    )
    assert len(straight.losses) == 4  # two batches a step
    assert (
        "lr-AdamW"
        in (tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    )


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize(
    ("row", "make_scheduler"), [("sequential-lr", warmup_then_cosine), ("one-cycle-lr", one_cycle)]
)
def test_schedulers_drive_the_optimizer_that_trains(way, row, make_scheduler, tmp_path):
    straight, _, _ = train_and_resume(
        way, lambda: Scheduled(make_scheduler), tmp_path, steps=6, save_at=4
    )
    assert straight.lrs == pytest.approx(expected_lrs(make_scheduler, 6), rel=1e-12)
    assert len(set(straight.lrs)) > 3  # the rate moved: the scheduler reached the optimizer


class NamedSGD(CausalLM):
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(
            [{"params": params, "name": "adapters"}], lr=0.05, momentum=0.9, nesterov=True
        )


class NamedAdamW(CausalLM):
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW([{"params": params, "name": "adapters"}], lr=1e-2)


@pytest.mark.parametrize("way", WAYS)
def test_other_optimizers_are_kept_and_adam_is_rebuilt_with_every_group_key(way, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        straight, _, _ = train_and_resume(way, NamedSGD, tmp_path / "sgd")
    (optimizer,) = straight.trainer.optimizers
    assert type(optimizer) is torch.optim.SGD
    group = optimizer.param_groups[0]
    assert (group["name"], group["momentum"], group["nesterov"]) == ("adapters", 0.9, True)
    kept = [r.getMessage() for r in caplog.records if "keeps the module's SGD" in r.getMessage()]
    # One line in each of the three runs, under the flag only; it says why.
    assert len(kept) == (3 if way == "nf4-lora" else 0)
    assert all("SGD is not Adam or AdamW" in line for line in kept)

    straight, _, _ = train_and_resume(way, NamedAdamW, tmp_path / "adamw")
    (optimizer,) = straight.trainer.optimizers
    assert type(optimizer).__name__ == ("AdamW8bit" if way == "nf4-lora" else "AdamW")
    assert optimizer.param_groups[0]["name"] == "adapters"


@pytest.mark.parametrize("way", WAYS)
def test_epoch_based_runs_with_validation_and_early_stopping_resume_exactly(way, tmp_path):
    epochs = lambda: [EarlyStopping(monitor="val_loss", patience=5)]  # noqa: E731
    _, resumed, _ = train_and_resume(
        way,
        CausalLM,
        tmp_path,
        steps=-1,
        save_at=2,
        saver={"every_n_epochs": 1},
        callbacks=epochs,
        max_epochs=3,
        val_data=token_data(8),
    )
    assert resumed.trainer.current_epoch == 3 and resumed.trainer.global_step == 6


@pytest.mark.parametrize("way", WAYS)
def test_adapter_weight_averaging_averages_and_saves_the_adapters_only(way, tmp_path):
    averaging = lambda: [AdapterWeightAveraging(decay=0.5)]  # noqa: E731
    straight, resumed, checkpoint = train_and_resume(way, CausalLM, tmp_path, callbacks=averaging)
    saved = torch.load(checkpoint, weights_only=True)
    (state,) = [v for k, v in saved["callbacks"].items() if "AdapterWeightAveraging" in k]
    module = straight.trainer.lightning_module
    names = sorted(adapter_parameter_names(module))
    # The file's state_dict is the average (what validation scores, what "best" means);
    # the adapters training goes on from are in the callback's state, adapters only.
    assert sorted(state["training_adapters"]) == names and state["updates"] == 2
    assert any(
        not torch.equal(saved["state_dict"][k], state["training_adapters"][k]) for k in names
    )
    # Training ends with the average in the model, the same in both runs.
    (averager,) = [c for c in straight.trainer.callbacks if isinstance(c, AdapterWeightAveraging)]
    model_now = module.state_dict()
    for key, value in averager.average.items():
        assert torch.equal(model_now[key], value), key
    (resumed_averager,) = [
        c for c in resumed.trainer.callbacks if isinstance(c, AdapterWeightAveraging)
    ]
    assert all(torch.equal(resumed_averager.average[k], v) for k, v in averager.average.items())


def test_a_checkpoint_written_during_validation_keeps_average_and_training_adapters_apart(
    tmp_path,
):
    """Saved while the average is swapped in for validation (Ctrl-C there, say): the file
    must not swap the two."""
    averaging = AdapterWeightAveraging(decay=0.5)
    path = tmp_path / "during-validation.ckpt"

    class SaveDuringValidation(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            names = adapter_parameter_names(module)
            self.training = {k: module.state_dict()[k].clone() for k in names}
            self.average = {k: v.clone() for k, v in averaging.average.items()}

        def on_validation_batch_end(self, trainer, *args) -> None:
            if not trainer.sanity_checking and not path.exists():
                assert averaging.average  # swapped in: the model holds it now
                trainer.save_checkpoint(path)

    saver = SaveDuringValidation()
    run("callback", CausalLM(), tmp_path, 2, [averaging, saver], val_data=token_data(8))
    saved = torch.load(path, weights_only=True)
    (state,) = [v for k, v in saved["callbacks"].items() if "AdapterWeightAveraging" in k]
    for name, tensor in saver.training.items():
        assert torch.equal(state["training_adapters"][name], tensor), name
        assert torch.equal(saved["state_dict"][name], saver.average[name]), name


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize(
    ("make_callback", "name"),
    [
        (lambda: EMAWeightAveraging(), "EMAWeightAveraging"),
        (lambda: StochasticWeightAveraging(swa_lrs=1e-3), "StochasticWeightAveraging"),
        (lambda: BackboneFinetuning(unfreeze_backbone_at_epoch=1), "BackboneFinetuning"),
        (lambda: ModelPruning("l1_unstructured", amount=0.5), "ModelPruning"),
    ],
)
def test_callbacks_that_would_change_the_base_are_refused_at_setup(
    way, make_callback, name, tmp_path
):
    module = CausalLM()
    module.backbone = module.model.model.layers[0]  # what BackboneFinetuning asks for
    before = frozen_tensors(module)
    alternative = "AdapterWeightAveraging" if "Averaging" in name else "Instead"
    with pytest.raises(
        AdapterConfigError, match=rf"^{name} cannot be used with adapters: .*{alternative}"
    ):
        run(way, module, tmp_path, 2, [make_callback()])
    if way == "callback":  # the flag quantizes the base first: nothing to compare with
        assert all(
            torch.equal(before[k], v) for k, v in frozen_tensors(module).items() if k in before
        )


class OwnLoader(CausalLM):
    """What BatchSizeFinder needs: the module builds its loader from ``self.batch_size``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batch_size = 4

    def train_dataloader(self) -> DataLoader:
        return DataLoader(list(token_data(8).dataset), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return token_data(8)


@pytest.mark.parametrize("way", WAYS)
def test_tuner_callbacks_search_then_training_proceeds(way, tmp_path, recwarn):
    _, way_kwargs = way_options(way)
    trainer_class = way_kwargs.pop("trainer_class", L.Trainer)
    for tuner in (
        LearningRateFinder(num_training_steps=4),
        BatchSizeFinder(max_trials=1, steps_per_trial=1),
    ):
        recorder = Recorder()
        trainer = trainer_class(
            callbacks=[*way_options(way)[0], tuner, recorder],
            accelerator="cpu",
            max_steps=3,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            **way_kwargs,
        )
        trainer.fit(OwnLoader())
        assert trainer.global_step == 3 and len(recorder.losses) == 3
    assert not [w for w in recwarn if "middle of an epoch" in str(w.message)]


@pytest.mark.parametrize("way", WAYS)
def test_16_bit_precisions_resume_exactly(way, tmp_path):
    options = (
        {"precision": "bf16-true"} if way == "callback" else {"precision": "nf4-lora-bf16-mixed"}
    )
    straight, _, _ = train_and_resume(way, CausalLM, tmp_path, **options)
    if way == "callback":
        assert straight.trainer.lightning_module.model.dtype == torch.bfloat16


class RecordsItsAdapters(CausalLM):
    def __init__(self, adapters: Any = QV_LORA, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()


@pytest.mark.parametrize("way", WAYS)
def test_hyperparameters_holding_an_adapter_config_resume_under_weights_only(way, tmp_path):
    _, _, checkpoint = train_and_resume(way, RecordsItsAdapters, tmp_path, weights_only=True)
    assert torch.load(checkpoint, weights_only=True)["hyper_parameters"]["adapters"] == QV_LORA


class OwnSummary(ModelSummary):
    pass


@pytest.mark.parametrize("way", WAYS)
def test_a_users_own_model_summary_counts_4bit_weights_whole(way, tmp_path):
    summary = OwnSummary(max_depth=2)
    recorder = run(way, CausalLM(), tmp_path, 1, [summary], enable_model_summary=True)
    assert isinstance(summary, OwnSummary)  # the same object, its settings kept
    module = recorder.trainer.lightning_module
    counted = summary._summary(recorder.trainer, module)
    assert counted.total_parameters == count_parameters(module).total
    plain = L.pytorch.utilities.model_summary.summarize(module).total_parameters
    if way == "nf4-lora":
        assert plain < counted.total_parameters  # Lightning alone counts packed weights half


def test_a_quantized_runs_checkpoint_says_how_to_load_it_without_a_trainer(tmp_path):
    save = AdapterCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    run("nf4-lora", MixinLM(), tmp_path / "a", 2, [save])
    (checkpoint,) = (tmp_path / "ckpt").glob("*.ckpt")
    with pytest.raises(
        lightning_peft.AdapterStateError,
        match=re.escape("lightning_peft.Trainer(precision='nf4-lora').validate(module"),
    ):
        MixinLM.load_from_checkpoint(checkpoint)
    # The way it names works.
    trainer = lightning_peft.Trainer(
        precision="nf4-lora", accelerator="cpu", logger=False, enable_progress_bar=False
    )
    module = MixinLM()
    trainer.validate(module, token_data(8), ckpt_path=str(checkpoint))
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    now = module.state_dict()
    assert all(torch.equal(now[k], v) for k, v in saved.items())


if __name__ == "__main__":
    print(ecosystem_table())


@pytest.mark.parametrize("way", WAYS)
def test_a_callback_trained_module_loads_its_adapters_from_a_checkpoint(way, tmp_path):
    from lightning_peft.lightning import load_adapter_checkpoint

    save = AdapterCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trained = RecordsItsAdapters()
    run(way, trained, tmp_path / "a", 2, [save])
    (checkpoint,) = (tmp_path / "ckpt").glob("*.ckpt")
    # What Lightning alone gives: a module without the adapters (strict=False drops them).
    plain = RecordsItsAdapters.load_from_checkpoint(checkpoint, strict=False)
    assert not adapter_parameter_names(plain)
    loaded = load_adapter_checkpoint(RecordsItsAdapters, checkpoint)
    ids = token_data(8).dataset[0][None]
    trained.eval()
    loaded.eval()
    with torch.no_grad():
        expected = trained.model(input_ids=ids).logits
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, expected, rtol=0, atol=0)
