"""LoRA on nn.Embedding and nn.Conv1d/2d/3d: PEFT's parameter counts, file format and
forward, merge and unmerge, and what is refused."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

from lightning_peft import (
    IA3,
    AdapterConfigError,
    AdapterStateError,
    LoRA,
    apply_adapters,
    count_parameters,
    load_peft,
    merge_adapters,
    mixed_batch,
    save_peft,
    unmerge_adapters,
)
from lightning_peft.errors import UnsupportedLayerError
from lightning_peft.injection import adapter_parameter_names
from lightning_peft.quantization import quantize_model
from tests.snapshots import refused_without_a_trace
from tests.tiny_models import peft_or_skip

TARGETS = ["embed", "conv1", "conv2", "conv3"]


class ConvNet(nn.Module):
    """An embedding, a convolution of each dimensionality and a linear head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(50, 16, padding_idx=0)
        self.conv1 = nn.Conv1d(16, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 4, 3, stride=2, padding=1, dilation=1)
        self.conv3 = nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1))
        self.head = nn.Linear(8 + 4 + 2, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.conv1(self.embed(input_ids).transpose(1, 2))  # (B, 8, T)
        image = hidden.unsqueeze(1)  # (B, 1, 8, T)
        pooled = [
            hidden.mean(-1),
            self.conv2(image).mean((-1, -2)),
            self.conv3(image.unsqueeze(2)).mean((-1, -2, -3)),
        ]
        return self.head(torch.cat(pooled, dim=-1))


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))


def moved_(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name in adapter_parameter_names(model):
            param = model.get_parameter(name)
            param.add_(0.2 * torch.randn_like(param))
    return model


def test_counts_and_tensor_names_equal_peft():
    ours = apply_adapters(ConvNet(), LoRA(rank=4, target_modules=TARGETS))
    theirs = peft_or_skip(
        peft.get_peft_model, ConvNet(), peft.LoraConfig(r=4, target_modules=TARGETS)
    )
    # Embedding 4 * (50 + 16); Conv1d 4*16*3 + 8*4; Conv2d 4*1*9 + 4*4; Conv3d 4*9 + 2*4
    assert count_parameters(ours).trainable == 264 + 224 + 52 + 44
    assert count_parameters(ours).trainable == sum(
        p.numel() for p in theirs.parameters() if p.requires_grad
    )
    shapes = {n: tuple(p.shape) for n, p in peft.get_peft_model_state_dict(theirs).items()}
    assert shapes["base_model.model.conv2.lora_A.weight"] == (4, 1, 3, 3)
    assert shapes["base_model.model.embed.lora_embedding_A"] == (4, 50)


def test_starts_equal_to_the_base_and_every_tensor_learns(ids):
    base = ConvNet()(ids)
    model = apply_adapters(ConvNet(), LoRA(rank=4, target_modules=TARGETS))
    torch.testing.assert_close(model(ids), base, rtol=0, atol=0)
    model(ids).square().sum().backward()
    embed_b = model.embed.lora_B["default"].weight
    assert embed_b.grad is not None and embed_b.grad.abs().sum() == 0  # A = 0 at init
    moved_(model)
    model.zero_grad()
    model(ids).square().sum().backward()
    for name in adapter_parameter_names(model):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_the_forward_equals_peft_and_files_load_both_ways(tmp_path, ids):
    ours = moved_(apply_adapters(ConvNet(), LoRA(rank=4, alpha=8, target_modules=TARGETS)))
    expected = ours(ids)
    save_peft(ours, tmp_path / "ours")
    theirs = peft_or_skip(peft.PeftModel.from_pretrained, ConvNet(), tmp_path / "ours")
    torch.testing.assert_close(theirs(ids), expected, rtol=1e-5, atol=1e-6)
    theirs.save_pretrained(tmp_path / "theirs")
    back = load_peft(ConvNet(), tmp_path / "theirs")
    torch.testing.assert_close(back(ids), expected, rtol=0, atol=0)


def test_merge_and_unmerge(ids):
    model = moved_(apply_adapters(ConvNet(), LoRA(rank=4, target_modules=TARGETS)))
    original = {n: t.clone() for n, t in model.state_dict().items() if "lora" not in n}
    expected = model(ids)
    merge_adapters(model)
    assert not torch.equal(model.conv2.weight, original["conv2.weight"])
    # float32: the merged kernel sums the same products in another order
    torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)
    unmerge_adapters(model)
    for name, tensor in original.items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=1e-6)


def test_a_4bit_model_keeps_embeddings_and_convolutions_float():
    model = ConvNet()
    model.proj = nn.Linear(16, 16)
    quantize_model(model, "nf4")
    assert type(model.embed) is nn.Embedding and type(model.conv2) is nn.Conv2d
    apply_adapters(model, LoRA(rank=2, target_modules=["embed", "conv2"]))
    assert model.conv2.base_layer.weight.dtype == torch.float32


@pytest.mark.parametrize(
    ("config", "target", "message"),
    [
        (LoRA(use_dora=True), "conv2", "use_dora=True covers linear layers, not Conv2d"),
        (LoRA(use_dora=True), "embed", "use_dora=True covers linear layers, not Embedding"),
    ],
)
def test_what_is_not_supported_is_refused_before_anything_changes(config, target, message):
    model = ConvNet()
    cfg = LoRA(rank=2, use_dora=config.use_dora, target_modules=[target])
    with refused_without_a_trace(model, AdapterConfigError, match=message):
        apply_adapters(model, cfg)


def test_a_grouped_convolution_is_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with refused_without_a_trace(model, AdapterConfigError, match=r"grouped Conv2d \(groups=2\)"):
        apply_adapters(model, LoRA(rank=2, target_modules=["0"]))


def test_mixed_batches_name_the_layer_they_cannot_route(ids):
    model = apply_adapters(ConvNet(), LoRA(rank=2, target_modules=["conv1"]))
    apply_adapters(model, LoRA(rank=2, target_modules=["conv1"]), name="other")
    with pytest.raises(
        AdapterStateError, match="mixed batches route LoRA on linear layers; Conv1d"
    ):
        with mixed_batch(model, ["default", "other"]):
            model(ids)


# -- nn.MultiheadAttention: Lightning's own demo transformer -------------------------------


def demo_transformer() -> nn.Module:
    from lightning.pytorch.demos.transformer import Transformer

    torch.manual_seed(0)
    return Transformer(vocab_size=50, ninp=32, nhead=4, nhid=64, nlayers=2, dropout=0.0).eval()


def transformer_ids() -> torch.Tensor:
    return torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def test_all_linear_adapts_attention_as_a_whole_and_every_tensor_learns():
    ids = transformer_ids()
    base = demo_transformer()(ids, ids)
    model = apply_adapters(demo_transformer(), LoRA(rank=4))
    attention = model.transformer.encoder.layers[0].self_attn
    assert type(attention).__name__ == "LoRAMultiheadAttention"
    assert type(attention.out_proj).__name__ == "LoRALinear"
    torch.testing.assert_close(model(ids, ids), base, rtol=0, atol=0)
    moved_(model)
    model.train()
    model(ids, ids).sum().backward()
    for name in adapter_parameter_names(model):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_attention_adapters_act_in_eval_mode_too():
    """PyTorch's fused eval paths read the bare weights; they must see the adapted ones."""
    ids = transformer_ids()
    base = demo_transformer()(ids, ids)
    model = moved_(apply_adapters(demo_transformer(), LoRA(rank=4)))
    trained = model.train()(ids, ids)  # dropout=0: train and eval compute the same
    with torch.no_grad():
        evaluated = model.eval()(ids, ids)
    torch.testing.assert_close(evaluated, trained, rtol=1e-5, atol=1e-5)
    assert (evaluated - base).abs().max() > 0.1


def test_attention_counts_equal_peft_and_merge_round_trips():
    targets = ["self_attn", "multihead_attn", "linear1", "linear2"]
    ours = apply_adapters(demo_transformer(), LoRA(rank=4, target_modules=targets))
    config = peft.LoraConfig(r=4, target_modules=targets)
    theirs = peft_or_skip(peft.get_peft_model, demo_transformer(), config)
    assert count_parameters(ours).trainable == sum(
        p.numel() for p in theirs.parameters() if p.requires_grad
    )
    moved_(ours)
    ids = transformer_ids()
    with torch.no_grad():
        expected = ours(ids, ids)
        merge_adapters(ours)
        torch.testing.assert_close(ours(ids, ids), expected, rtol=1e-5, atol=1e-5)
        unmerge_adapters(ours)
        torch.testing.assert_close(ours(ids, ids), expected, rtol=1e-5, atol=1e-5)


def test_nf4_keeps_attention_float_and_trains():
    model = quantize_model(demo_transformer(), "nf4", adapters=LoRA(rank=4))
    attention = model.transformer.encoder.layers[0].self_attn
    assert attention.out_proj.base_layer.weight.dtype == torch.float32
    assert "Linear4bit" in type(model.transformer.encoder.layers[0].linear1.base_layer).__name__
    ids = transformer_ids()
    model.train()(ids, ids).sum().backward()
    assert attention.lora_B["default"].weight.grad is not None


def test_an_adapter_inside_attention_is_refused_with_the_reason():
    model = demo_transformer()
    with refused_without_a_trace(
        model,
        UnsupportedLayerError,
        match=r"self_attn\.out_proj is inside the nn\.MultiheadAttention .*self_attn, which reads "
        r"its weight directly.*Target .*self_attn itself",
    ):
        apply_adapters(model, LoRA(rank=2, target_modules=["self_attn.out_proj"]))


def test_attention_has_no_dropout_to_apply():
    model = demo_transformer()
    with refused_without_a_trace(
        model, AdapterConfigError, match="got dropout=0.1; use dropout=0.0"
    ):
        apply_adapters(model, LoRA(rank=2, dropout=0.1, target_modules=["self_attn"]))


# -- IA3 on convolutions ---------------------------------------------------------------------


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "input"])
def test_ia3_scales_conv_channels_as_peft_and_merges(tmp_path, ids, feedforward):
    # PEFT's IA3 wraps Conv2d (not Conv1d/3d, which it refuses): compare there
    ff = ["conv2"] if feedforward else []
    ours = apply_adapters(ConvNet(), IA3(target_modules=["conv2"], feedforward_modules=ff))
    theirs = peft.get_peft_model(
        ConvNet(), peft.IA3Config(target_modules=["conv2"], feedforward_modules=ff)
    )
    assert count_parameters(ours).trainable == sum(
        p.numel() for p in theirs.parameters() if p.requires_grad
    )
    assert tuple(ours.conv2.ia3_l["default"].shape) == (
        (1, 1, 1, 1) if feedforward else (1, 4, 1, 1)
    )
    moved_(ours)
    expected = ours(ids)
    save_peft(ours, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(ConvNet(), tmp_path)
    torch.testing.assert_close(peft_model(ids), expected, rtol=1e-5, atol=1e-6)
    merge_adapters(ours)
    torch.testing.assert_close(ours(ids), expected, rtol=1e-5, atol=1e-5)


def test_ia3_on_every_convolution_learns_and_merges(ids):
    targets = ["conv1", "conv2", "conv3"]
    model = apply_adapters(ConvNet(), IA3(target_modules=targets, feedforward_modules=["conv3"]))
    torch.testing.assert_close(model(ids), ConvNet()(ids), rtol=0, atol=0)
    moved_(model)
    expected = model(ids)
    expected.square().sum().backward()
    for name in adapter_parameter_names(model):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    merge_adapters(model)
    torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)


def test_lightnings_demo_transformer_trains_with_the_callback_under_nf4(tmp_path):
    """LightningTransformer as users run it, with PeftCallback and the nf4-lora precision
    (its prepare_data would download WikiText2: random tokens here)."""
    import lightning as L
    from lightning.pytorch.demos.transformer import LightningTransformer
    from torch.utils.data import DataLoader

    from lightning_peft import PeftCallback, PeftPrecision

    class Offline(LightningTransformer):
        def prepare_data(self) -> None:
            pass

        def train_dataloader(self):
            ids = torch.randint(0, 64, (8, 2, 6), generator=torch.Generator().manual_seed(0))
            return DataLoader([(row[0], row[1]) for row in ids], batch_size=4)

    torch.manual_seed(0)
    module = Offline(vocab_size=64)
    trainer = L.Trainer(
        max_steps=4,
        callbacks=[PeftCallback(LoRA(rank=4))],
        plugins=[PeftPrecision("nf4-lora")],
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    attention = module.model.transformer.encoder.layers[0].self_attn
    assert type(attention).__name__ == "LoRAMultiheadAttention"
    assert attention.lora_B["default"].weight.abs().sum() > 0  # trained
    assert attention.base_layer.out_proj.lora_B["default"].weight.abs().sum() > 0
    assert (
        "Linear4bit" in type(module.model.transformer.encoder.layers[0].linear1.base_layer).__name__
    )


def test_peft_files_of_attention_adapters_warn_that_peft_applies_out_proj_twice(tmp_path):
    model = moved_(apply_adapters(demo_transformer(), LoRA(rank=4, target_modules=["self_attn"])))
    with pytest.warns(UserWarning, match="applies the out_proj update of such a layer twice"):
        save_peft(model, tmp_path)
    with pytest.warns(UserWarning, match="applies the out_proj update"):
        back = load_peft(demo_transformer(), tmp_path)
    ids = transformer_ids()
    with torch.no_grad():
        torch.testing.assert_close(back(ids, ids), model(ids, ids), rtol=0, atol=0)


def test_deleting_the_adapter_unwraps_attention_and_its_out_proj():
    from lightning_peft import delete_adapter

    ids = transformer_ids()
    base = demo_transformer()(ids, ids)
    model = moved_(apply_adapters(demo_transformer(), LoRA(rank=4)))
    apply_adapters(model, LoRA(rank=2), name="other")
    delete_adapter(model, "other")
    delete_adapter(model, "default")
    assert not [n for n, m in model.named_modules() if type(m).__name__.startswith("LoRA")]
    torch.testing.assert_close(model(ids, ids), base, rtol=1.3e-6, atol=1e-5)


def test_mixed_batches_refuse_attention_adapters():
    model = apply_adapters(demo_transformer(), LoRA(rank=2, target_modules=["self_attn"]))
    apply_adapters(model, LoRA(rank=2, target_modules=["self_attn"]), name="other")
    ids = transformer_ids()
    with pytest.raises(AdapterStateError, match="mixed batches route LoRA on linear layers"):
        with mixed_batch(model, ["default", "other"]):
            model(ids, ids)


def test_a_padded_batch_through_an_adapted_encoder_in_eval_mode():
    """nn.TransformerEncoder would turn a padded batch into nested tensors for its fused
    path, which the adapters cannot take: that path stays off where they sit."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    inputs = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        base = encoder(inputs, src_key_padding_mask=padding)
        moved_(apply_adapters(encoder, LoRA(rank=2)))
        adapted = encoder(inputs, src_key_padding_mask=padding)
    assert adapted.shape == base.shape
    assert (adapted - base)[0].abs().max() > 1e-3
