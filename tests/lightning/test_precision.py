"""PeftPrecision and lightning_peft.Trainer(precision="nf4-lora"): QLoRA inside Lightning."""

from __future__ import annotations

import contextlib

import bitsandbytes as bnb
import lightning as L
import pytest
import torch

import lightning_peft
from lightning_peft import (
    AdapterCheckpoint,
    AdapterConfigError,
    LoRA,
    PeftCallback,
    PeftPrecision,
    adapter_state_dict,
)
from lightning_peft.adapters import LoRALinear
from tests.lightning_modules import CausalLM, MixinLM, counting_data, fit, token_data

DECODER_LINEARS = 14  # 7 projections x 2 layers of the tiny Llama


def base_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m.base_layer for m in module.modules() if isinstance(m, LoRALinear)]


def test_plugin_on_a_plain_trainer_quantizes_attaches_and_learns(tmp_path):
    module = CausalLM()
    run = fit(module, tmp_path, 40, [], data=counting_data(), plugins=[PeftPrecision("nf4-lora")])
    layers = base_layers(module)
    assert len(layers) == DECODER_LINEARS  # default adapters: LoRA r=8 on every linear but the head
    assert all(
        isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_type == "nf4"
        for layer in layers
    )
    assert all(layer.weight.compress_statistics for layer in layers)  # double quantization
    assert type(module.model.lm_head) is torch.nn.Linear  # the head stays in float
    assert {n for n, p in module.named_parameters() if p.requires_grad} == set(
        adapter_state_dict(module)
    )
    assert all(t.dtype == torch.float32 for t in adapter_state_dict(module).values())
    first, last = sum(run.losses[:5]) / 5, sum(run.losses[-5:]) / 5
    assert last < first - 0.25, run.losses  # the LR decays 10% a step, so the gain is modest


@pytest.mark.parametrize(
    ("flag", "layer_type", "quant_type", "double_quant"),
    [
        ("nf4-lora", bnb.nn.Linear4bit, "nf4", True),
        ("nf4-lora-nodq", bnb.nn.Linear4bit, "nf4", False),
        ("fp4-lora", bnb.nn.Linear4bit, "fp4", True),
        ("int8-lora", bnb.nn.Linear8bitLt, None, None),
    ],
)
def test_each_mode_through_the_package_trainer(
    flag, layer_type, quant_type, double_quant, tmp_path
):
    module = CausalLM()
    run = fit(module, tmp_path, 2, [], trainer_class=lightning_peft.Trainer, precision=flag)
    assert any(isinstance(cb, PeftCallback) for cb in run.trainer.callbacks)  # added for resume
    layers = base_layers(module)
    assert len(layers) == DECODER_LINEARS and all(isinstance(layer, layer_type) for layer in layers)
    if quant_type is not None:
        assert {
            (layer.weight.quant_type, layer.weight.compress_statistics) for layer in layers
        } == {(quant_type, double_quant)}
    else:
        assert all(layer.weight.dtype == torch.int8 for layer in layers)


def test_bf16_compute_suffix(tmp_path):
    module = CausalLM()
    run = fit(
        module,
        tmp_path,
        2,
        [],
        trainer_class=lightning_peft.Trainer,
        precision="nf4-lora-bf16-mixed",
    )
    assert run.trainer.precision == "bf16-mixed"
    assert {layer.compute_dtype for layer in base_layers(module)} == {torch.bfloat16}


def test_a_bf16_base_keeps_its_norms_in_float32_under_4bit(tmp_path):
    module = CausalLM()
    module.model.to(torch.bfloat16)
    norms = {n: p.clone() for n, p in module.named_parameters() if "norm" in n}
    assert len(norms) == 5 and all(p.dtype == torch.bfloat16 for p in norms.values())
    run = fit(
        module,
        tmp_path,
        3,
        [],
        trainer_class=lightning_peft.Trainer,
        precision="nf4-lora-bf16-mixed",
    )
    after = dict(module.named_parameters())
    for name, before in norms.items():  # float32 now, same values (the upcast is exact)
        assert after[name].dtype == torch.float32, name
        assert torch.equal(after[name], before.float()), name
    # the other float tensors keep their dtype: the embedding is not a norm
    assert module.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(run.losses)))


def test_int8_and_float32_bases_keep_their_norms_as_they_are(tmp_path):
    module = CausalLM()
    module.model.to(torch.bfloat16)
    fit(module, tmp_path, 1, [], trainer_class=lightning_peft.Trainer, precision="int8-lora")
    assert module.model.model.norm.weight.dtype == torch.bfloat16  # not a 4-bit base
    module = CausalLM()
    fit(module, tmp_path, 1, [], trainer_class=lightning_peft.Trainer, precision="nf4-lora")
    assert module.model.model.norm.weight.dtype == torch.float32


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("paged_adamw_8bit", bnb.optim.PagedAdamW8bit),
        ("paged_adamw_32bit", bnb.optim.PagedAdamW32bit),
        ("adamw_8bit", bnb.optim.AdamW8bit),
        ("adamw", torch.optim.AdamW),
    ],
)
def test_the_configured_optimizer_is_rebuilt_keeping_hyperparameters_and_scheduler(
    name, cls, tmp_path
):
    plugin = PeftPrecision(
        "nf4-lora", optimizer=name, optimizer_kwargs={"min_8bit_size": 1} if "8bit" in name else {}
    )
    module = CausalLM()
    expect_warning = pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU")
    with expect_warning if "paged" in name else contextlib.nullcontext():
        run = fit(
            module,
            tmp_path,
            3,
            [PeftCallback(LoRA(rank=4, target_modules=["q_proj", "v_proj"]))],
            plugins=[plugin],
        )
    optimizer = run.trainer.optimizers[0]
    assert type(optimizer) is cls
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(params) == 8 and all(p.requires_grad for p in params)
    scheduler = run.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.optimizer is optimizer
    assert optimizer.param_groups[0]["lr"] == pytest.approx(
        1e-2 * 0.9**3
    )  # StepLR kept stepping it
    assert optimizer.param_groups[0]["weight_decay"] == 0.01 and optimizer.param_groups[0][
        "betas"
    ] == (0.9, 0.999)
    state = optimizer.state[params[0]]
    if "8bit" in name:
        assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    elif name == "paged_adamw_32bit":
        assert state["state1"].dtype == torch.float32


@pytest.mark.parametrize("design", ["trainer-flag", "mixin"])
def test_resume_is_exact_under_nf4_lora_with_a_paged_8bit_optimizer(design, tmp_path):
    def plugin() -> PeftPrecision:
        return PeftPrecision(
            "nf4-lora", optimizer="paged_adamw_8bit", optimizer_kwargs={"min_8bit_size": 1}
        )

    def make() -> L.LightningModule:
        return MixinLM() if design == "mixin" else CausalLM()

    options = dict(trainer_class=lightning_peft.Trainer, plugins=[plugin()])
    straight = make()
    reference = fit(straight, tmp_path / "a", 6, [], **options)
    saver = AdapterCheckpoint(dirpath=tmp_path / "ckpt", filename="half", every_n_train_steps=3)
    fit(
        make(), tmp_path / "b", 3, [saver], trainer_class=lightning_peft.Trainer, plugins=[plugin()]
    )
    checkpoint = torch.load(tmp_path / "ckpt" / "half.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == set(
        adapter_state_dict(straight)
    )  # no 4-bit base inside
    resumed = make()
    second = fit(
        resumed,
        tmp_path / "c",
        6,
        [],
        ckpt_path=str(tmp_path / "ckpt" / "half.ckpt"),
        trainer_class=lightning_peft.Trainer,
        plugins=[plugin()],
    )
    assert second.losses == reference.losses[3:]
    final, expected = adapter_state_dict(resumed), adapter_state_dict(straight)
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_mixin_module_is_quantized_before_its_adapters_attach(tmp_path):
    module = MixinLM()
    fit(module, tmp_path, 1, [], plugins=[PeftPrecision("nf4-lora")])
    layers = base_layers(module)
    assert len(layers) == 4 and all(
        isinstance(layer, bnb.nn.Linear4bit) for layer in layers
    )  # q, v x 2
    assert isinstance(
        module.model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit
    )  # no adapter, still 4-bit


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: PeftPrecision("q4-lora"),
            r"mode must be one of \('nf4-lora', 'nf4-lora-nodq', 'fp4-lora', 'int8-lora'\), "
            r"got 'q4-lora'",
        ),
        (
            lambda: PeftPrecision(compute="fp8"),
            r"compute must be one of \('32-true', 'bf16-mixed', '16-mixed'\), got 'fp8'",
        ),
        (
            lambda: PeftPrecision(optimizer="sgd_8bit"),
            r"optimizer must be None, 'auto' or one of \('paged_adamw_8bit'.*got 'sgd_8bit'",
        ),
        (
            lambda: PeftPrecision(blocksize=100),
            r"blocksize must be a power of two from 64 to 4096, got 100",
        ),
        (
            lambda: lightning_peft.Trainer(precision="nf4-lorra"),
            r"precision='nf4-lorra' is not a lightning_peft mode; valid modes: nf4-lora, "
            r"nf4-lora-nodq",
        ),
    ],
)
def test_bad_modes_and_options_are_refused_listing_the_valid_ones(make, message):
    with pytest.raises(AdapterConfigError, match=message):
        make()


def test_lightning_precision_flags_still_pass_through():
    trainer = lightning_peft.Trainer(precision="bf16-mixed", logger=False, accelerator="cpu")
    assert trainer.precision == "bf16-mixed"
    assert not any(isinstance(cb, PeftCallback) for cb in trainer.callbacks)


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("nf4-lora", bnb.optim.AdamW8bit),  # the CPU: 8-bit AdamW, unpaged
        ("nf4-lora-nodq", bnb.optim.AdamW8bit),
        ("fp4-lora", bnb.optim.AdamW8bit),
        ("int8-lora", torch.optim.AdamW),  # not a 4-bit mode: the module's own
    ],
)
def test_the_4bit_flags_train_with_8bit_adamw_by_default_keeping_the_modules_settings(
    flag, expected, tmp_path
):
    module = CausalLM(lr=3e-3)
    run = fit(module, tmp_path, 2, [], trainer_class=lightning_peft.Trainer, precision=flag)
    optimizer = run.trainer.optimizers[0]
    assert type(optimizer) is expected
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-3 * 0.9**2)  # StepLR kept
    assert run.trainer.lr_scheduler_configs[0].scheduler.optimizer is optimizer


def test_the_default_optimizer_is_paged_on_cuda_and_none_keeps_the_modules():
    assert PeftPrecision("nf4-lora", device="cuda").optimizer == "paged_adamw_8bit"
    assert PeftPrecision("nf4-lora", device="cpu").optimizer == "adamw_8bit"
    assert PeftPrecision("nf4-lora", optimizer=None).optimizer is None


def test_validating_after_fit_keeps_the_rebuilt_optimizer_and_its_state(tmp_path):
    """Lightning connects the precision plugin again for every validate/test: the 8-bit
    optimizer fit rebuilt, and its state, must survive that."""
    module = CausalLM()
    run = fit(module, tmp_path, 2, [], trainer_class=lightning_peft.Trainer, precision="nf4-lora")
    optimizer = run.trainer.optimizers[0]
    assert len(optimizer.state) > 0
    run.trainer.validate(module, token_data(4), verbose=False)
    assert run.trainer.optimizers[0] is optimizer and len(optimizer.state) > 0


def test_16_mixed_compute_hands_scaling_and_clipping_to_lightnings_mixed_precision(tmp_path):
    module = CausalLM()
    plugin = PeftPrecision("nf4-lora", "16-mixed", device="cpu")
    run = fit(module, tmp_path, 3, [], plugins=[plugin], gradient_clip_val=1.0)
    assert run.trainer.precision == "16-mixed"
    assert isinstance(plugin.mixed, L.pytorch.plugins.precision.MixedPrecision)
    scaler = plugin.mixed.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.get_scale() > 0
    assert all(torch.isfinite(torch.tensor(loss)) for loss in run.losses)
    run.trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["PeftPrecision"]
    assert saved["scale"] == scaler.get_scale()  # the scaler's state travels with the run
    trained = [v for k, v in adapter_state_dict(module).items() if "lora_B" in k]
    assert trained and all(v.abs().sum() > 0 for v in trained)  # B left zero: steps were taken
