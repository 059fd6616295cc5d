"""The model x method matrix: eleven transformers families (tiny configs) and Lightning's demo
transformer, each with every method, checked the same way.

For each cell: attach the method; if it starts equal to the base (all but prompt and prefix
tuning), the output must equal the base's; one backward must reach every adapter tensor; a few
Adam steps must lower the loss on a fixed batch; and where Hugging Face PEFT has the same
config, its trainable count must equal ours. ``tests/test_matrix.py`` asserts each cell;
``python tests/matrix.py`` prints the table (docs/methods.md holds it, and a test checks it is this
one).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers as tf
from torch import nn

from lightning_peft import (
    IA3,
    BitFit,
    LoRA,
    PrefixTuning,
    PromptTuning,
    apply_adapters,
    count_parameters,
)
from lightning_peft.injection import adapter_parameter_names
from lightning_peft.quantization import quantize_model

VOCAB = 128
SMALL = {"vocab_size": VOCAB}


def _text(config: Any, model_class: type) -> Callable[[], nn.Module]:
    return lambda: model_class(config)


def _llama_like(config_class: type, model_class: type, **extra: Any) -> Callable[[], nn.Module]:
    config = config_class(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **SMALL,
        **extra,
    )
    return _text(config, model_class)


def demo_transformer() -> nn.Module:
    from lightning.pytorch.demos.transformer import Transformer

    return Transformer(vocab_size=VOCAB, ninp=32, nhead=4, nhid=64, nlayers=2, dropout=0.0)


BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
# name -> (builder, kind of input, PEFT task type)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], str, str | None]] = {
    "BERT": (
        _text(tf.BertConfig(**BERT, **SMALL, num_labels=3), tf.BertForSequenceClassification),
        "classify",
        "SEQ_CLS",
    ),
    "RoBERTa": (
        _text(tf.RobertaConfig(**BERT, **SMALL, num_labels=3), tf.RobertaForSequenceClassification),
        "classify",
        "SEQ_CLS",
    ),
    "GPT-2": (
        _text(
            tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **SMALL),
            tf.GPT2LMHeadModel,
        ),
        "causal",
        "CAUSAL_LM",
    ),
    "Llama": (_llama_like(tf.LlamaConfig, tf.LlamaForCausalLM), "causal", "CAUSAL_LM"),
    "Qwen2": (_llama_like(tf.Qwen2Config, tf.Qwen2ForCausalLM), "causal", "CAUSAL_LM"),
    "Mistral": (_llama_like(tf.MistralConfig, tf.MistralForCausalLM), "causal", "CAUSAL_LM"),
    "GPT-NeoX": (
        _text(
            tf.GPTNeoXConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                **SMALL,
            ),
            tf.GPTNeoXForCausalLM,
        ),
        "causal",
        "CAUSAL_LM",
    ),
    "Phi": (
        _text(
            tf.PhiConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                **SMALL,
            ),
            tf.PhiForCausalLM,
        ),
        "causal",
        "CAUSAL_LM",
    ),
    "T5": (
        _text(
            tf.T5Config(
                d_model=32,
                d_ff=64,
                d_kv=8,
                num_heads=4,
                num_layers=2,
                decoder_start_token_id=0,
                **SMALL,
            ),
            tf.T5ForConditionalGeneration,
        ),
        "seq2seq",
        "SEQ_2_SEQ_LM",
    ),
    "ViT": (
        _text(
            tf.ViTConfig(**BERT, image_size=16, patch_size=8, num_channels=3, num_labels=3),
            tf.ViTForImageClassification,
        ),
        "image",
        "SEQ_CLS",  # PEFT's task type that trains the classifier (its docs' ViT recipe)
    ),
    "Whisper": (
        _text(
            tf.WhisperConfig(
                d_model=32,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                num_mel_bins=8,
                max_source_positions=8,
                max_target_positions=32,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                decoder_start_token_id=1,
                **SMALL,
            ),
            tf.WhisperForConditionalGeneration,
        ),
        "audio",
        "SEQ_2_SEQ_LM",
    ),
    "Lightning demo transformer (nn.MultiheadAttention)": (demo_transformer, "demo", None),
}


def batch(kind: str) -> dict[str, torch.Tensor]:
    """A fixed batch for a family's kind of input, with labels."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 8), generator=generator)
    if kind == "classify":
        return {"input_ids": ids, "labels": torch.tensor([0, 2])}
    if kind == "causal":
        return {"input_ids": ids, "labels": ids}
    if kind == "seq2seq":
        return {"input_ids": ids, "labels": ids[:, :5].contiguous()}
    if kind == "image":
        return {
            "pixel_values": torch.randn(2, 3, 16, 16, generator=generator),
            "labels": torch.tensor([0, 2]),
        }
    if kind == "audio":
        return {
            "input_features": torch.randn(2, 8, 16, generator=generator),
            "labels": ids[:, :5].contiguous(),
        }
    return {"inputs": ids, "target": ids}  # the demo transformer: (inputs, target)


def output(model: nn.Module, kind: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if kind == "demo":
        return model(inputs["inputs"], inputs["target"])
    return model(
        **{k: v for k, v in inputs.items() if k != "labels"}, **_decoder(kind, inputs)
    ).logits


def loss(model: nn.Module, kind: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if kind == "demo":
        log_probs = model(inputs["inputs"], inputs["target"])
        return nn.functional.nll_loss(log_probs, inputs["target"].view(-1))
    return model(**inputs).loss


def _decoder(kind: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if kind in ("seq2seq", "audio"):
        return {"decoder_input_ids": inputs["labels"]}
    return {}


# -- methods ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    name: str
    config: Callable[[], Any]
    identity: bool  # starts equal to the base
    peft: Callable[[str | None, Any], Any] | None  # the same config in PEFT (task type, ours)
    nf4: bool = False


def _peft(name: str, **fields: Any) -> Callable[[str | None, Any], Any]:
    def build(task: str | None, config: Any) -> Any:
        import peft

        return getattr(peft, name)(task_type=task, **fields)

    return build


def _same_targets(task: str | None, config: Any) -> Any:
    import peft

    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=config.target_modules, task_type=task)


METHODS = {
    "LoRA": Method(
        "LoRA",
        lambda: LoRA(rank=4, alpha=8),
        True,
        _peft("LoraConfig", r=4, lora_alpha=8, target_modules="all-linear"),
    ),
    "IA3": Method("IA3", lambda: IA3(), True, _peft("IA3Config")),
    "Prompt": Method(
        "Prompt",
        lambda: PromptTuning(num_virtual_tokens=4),
        False,
        _peft("PromptTuningConfig", num_virtual_tokens=4),
    ),
    "Prefix": Method(
        "Prefix",
        lambda: PrefixTuning(num_virtual_tokens=4),
        False,
        _peft("PrefixTuningConfig", num_virtual_tokens=4, prefix_projection=True),
    ),
    "BitFit": Method("BitFit", lambda: BitFit(), True, None),
    "nf4-lora": Method(
        "nf4-lora",
        lambda: LoRA(rank=4, alpha=8),
        True,
        _peft("LoraConfig", r=4, lora_alpha=8, target_modules="all-linear"),
        nf4=True,
    ),
    "LoRA on embeddings": Method("LoRA on embeddings", lambda: None, True, _same_targets),
    "LoRA on convolutions": Method("LoRA on convolutions", lambda: None, True, _same_targets),
}


def _layer_targets(model: nn.Module, kinds: tuple[type, ...], kind: str) -> str | None:
    """A regex selecting every layer of exactly these types (subclasses such as Whisper's
    positional embedding compute something else) that the forward calls (T5's ``shared``
    only lends its weight to ``encoder.embed_tokens``), or None when there is none."""
    called: list[str] = []
    hooks = [
        module.register_forward_hook(lambda *_, name=name: called.append(name))
        for name, module in model.named_modules()
        if name and type(module) in kinds
    ]
    with torch.no_grad():
        output(model, kind, batch(kind))
    for hook in hooks:
        hook.remove()
    return "|".join(re.escape(name) for name in dict.fromkeys(called)) or None


def method_config(method: Method, model: nn.Module, kind: str) -> Any:
    """The config of a cell; None when the model has no layer the method's targets name."""
    kinds = {"LoRA on embeddings": (nn.Embedding,), "LoRA on convolutions": _CONVOLUTIONS}
    if method.name in kinds:
        targets = _layer_targets(model, kinds[method.name], kind)
        return LoRA(rank=4, alpha=8, target_modules=targets) if targets else None
    return method.config()


_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class Cell:
    """What one model x method combination did. ``refused`` holds the error's first line."""

    trainable: int = 0
    identity: bool | None = None  # None: the method does not start equal to the base
    all_grads: bool = False
    loss_before: float = 0.0
    loss_after: float = 0.0
    peft_trainable: int | None = None  # None: no same config in PEFT, or PEFT failed
    refused: str | None = None
    absent: bool = False  # the model has no layer of this kind

    @property
    def learned(self) -> bool:
        return self.loss_after < self.loss_before


def build(family: str, nf4: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family][0]().eval()
    if nf4:
        quantize_model(model, "nf4")
    return model


def run_cell(family: str, method_name: str, steps: int = 4) -> Cell:
    method = METHODS[method_name]
    _builder, kind, _task = FAMILIES[family]
    inputs = batch(kind)
    base = build(family, method.nf4)
    with torch.no_grad():
        base_output = output(base, kind, inputs)
    model = build(family, method.nf4)
    config = method_config(method, model, kind)
    if config is None:
        return Cell(absent=True)
    try:
        apply_adapters(model, config)
    except Exception as error:  # the cell shows the refusal; test_matrix checks it is one
        return Cell(refused=f"{type(error).__name__}: {str(error).splitlines()[0]}")
    cell = Cell(trainable=count_parameters(model).trainable)
    with torch.no_grad():
        if method.identity:  # float32 tolerance: a fused kernel of the base (nn.Transformer's
            # eval path) sums in another order than the unfused path adapters run through
            adapted = output(model, kind, inputs)
            cell.identity = bool(torch.allclose(adapted, base_output, rtol=1.3e-6, atol=1e-5))
    try:
        train_cell(cell, model, kind, inputs, steps)
    except Exception as error:  # one cell's failure is that cell's, not the matrix's
        return Cell(refused=f"failed after attaching: {type(error).__name__}: {error}")
    cell.peft_trainable = peft_count(family, method, config)
    return cell


def train_cell(cell: Cell, model: nn.Module, kind: str, inputs: dict, steps: int) -> None:
    names = adapter_parameter_names(model)
    optimizer = torch.optim.Adam([model.get_parameter(n) for n in names], lr=1e-2)
    for step in range(steps + 1):
        current = loss(model, kind, inputs)
        current.backward()
        if step == 0:
            cell.loss_before = current.item()
        if step == 1:  # after one step: LoRA's B (an embedding's A) starts at zero
            cell.all_grads = bool(names) and all(_has_gradient(model, n) for n in names)
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        cell.loss_after = loss(model, kind, inputs).item()


def _has_gradient(model: nn.Module, name: str) -> bool:
    grad = model.get_parameter(name).grad
    return grad is not None and bool(grad.abs().sum() > 0)


def peft_count(family: str, method: Method, config: Any) -> int | None:
    """PEFT's trainable count for the same config, or None (none, or PEFT fails on it)."""
    if method.peft is None:
        return None
    import peft

    task = FAMILIES[family][2]
    try:
        model = peft.get_peft_model(build(family, method.nf4), method.peft(task, config))
    except Exception:
        return None
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def cell_text(cell: Cell, refusals: list[str]) -> str:
    if cell.absent:
        return "–"
    if cell.refused:
        return f"refused ({refusals.index(_short(cell.refused)) + 1})"
    checks = cell.all_grads and cell.learned and cell.identity is not False
    text = f"{'✓' if checks else '✗'} {cell.trainable:,}"
    if cell.peft_trainable is not None:
        text += (
            " = PEFT"
            if cell.peft_trainable == cell.trainable
            else f" (PEFT {cell.peft_trainable:,})"
        )
    return text


def table(cells: dict[tuple[str, str], Cell]) -> str:
    methods = list(METHODS)
    lines = [
        "| model | " + " | ".join(methods) + " |",
        "|---|" + "---:|" * len(methods),
    ]
    ordered = [cells[f, m] for f in FAMILIES for m in methods]
    refusals = list(dict.fromkeys(_short(c.refused) for c in ordered if c.refused))
    for family in FAMILIES:
        row = [cell_text(cells[family, method], refusals) for method in methods]
        lines.append(f"| {family} | " + " | ".join(row) + " |")
    notes = [f"{i}. {reason}" for i, reason in enumerate(refusals, start=1)]
    return "\n".join([*lines, "", *notes]) + "\n"


def _short(refusal: str) -> str:
    """A refusal's first clause (the message goes on to say what to do instead)."""
    return refusal.split(";")[0].split(": pass ")[0].split(". ")[0]


def all_cells() -> dict[tuple[str, str], Cell]:
    return {(f, m): run_cell(f, m) for f in FAMILIES for m in METHODS}


if __name__ == "__main__":
    print(table(all_cells()), end="")
    sys.exit(0)
