"""LoRA on nn.Embedding and nn.Conv1d/2d/3d: PEFT's parameter counts, file format and
forward, merge and unmerge, and what is refused."""

from __future__ import annotations

import peft
import pytest
import torch
from snapshots import refused_without_a_trace
from torch import nn

from lightning_peft import (
    AdapterConfigError,
    AdapterStateError,
    LoRA,
    adapter_parameter_names,
    apply_adapters,
    count_parameters,
    load_peft,
    merge_adapters,
    mixed_batch,
    save_peft,
    unmerge_adapters,
)
from lightning_peft.quantization import quantize_model

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
    theirs = peft.get_peft_model(ConvNet(), peft.LoraConfig(r=4, target_modules=TARGETS))
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
    theirs = peft.PeftModel.from_pretrained(ConvNet(), tmp_path / "ours")
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
