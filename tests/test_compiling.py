"""Adapted models compile: no graph break in the adapters' code, and compile_layers gives the
eager model's outputs and gradients (``aot_eager``: the whole tracing path, no C++ build)."""

from __future__ import annotations

import pytest
import torch

from lightning_peft import IA3, LoRA, PrefixTuning, PromptTuning, apply_adapters
from lightning_peft.compiling import compile_layers, repeated_blocks
from lightning_peft.quantization import quantize_model
from tests.tiny_models import VOCAB, tiny_llama

METHODS = {
    "lora": LoRA(rank=4, target_modules="all-linear"),
    "dora": LoRA(rank=4, use_dora=True, target_modules=["q_proj", "v_proj"]),
    "ia3": IA3(),
    "prompt": PromptTuning(num_virtual_tokens=3),
    "prefix": PrefixTuning(num_virtual_tokens=3),
}


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("nf4", [False, True], ids=["float", "nf4"])
@pytest.mark.parametrize("method", METHODS)
def test_no_graph_break_comes_from_the_adapters(method, nf4):
    torch._dynamo.reset()
    model = tiny_llama()
    if nf4:
        quantize_model(model, "nf4")
    apply_adapters(model, METHODS[method]).train()
    explained = torch._dynamo.explain(model)(input_ids=ids(), labels=ids(), use_cache=False)
    ours = [
        reason
        for reason in explained.break_reasons
        if any("lightning_peft" in frame.filename for frame in reason.user_stack)
    ]
    assert ours == [], [reason.reason for reason in ours]
    assert explained.graph_count >= 1


def test_compile_layers_matches_eager_outputs_and_gradients():
    torch._dynamo.reset()
    eager = apply_adapters(tiny_llama(), LoRA(rank=4)).train()
    compiled = apply_adapters(tiny_llama(), LoRA(rank=4)).train()
    compiled.load_state_dict(eager.state_dict())
    with torch.no_grad():
        for name, param in eager.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(1))
                compiled.get_parameter(name).copy_(param)
    assert compile_layers(compiled, backend="aot_eager") == 2
    for model in (eager, compiled):
        model(input_ids=ids(), labels=ids(), use_cache=False).loss.backward()
    expected = eager(input_ids=ids(), use_cache=False).logits
    torch.testing.assert_close(
        compiled(input_ids=ids(), use_cache=False).logits, expected, rtol=1e-5, atol=1e-5
    )
    for name, param in eager.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(
                compiled.get_parameter(name).grad, param.grad, rtol=1e-4, atol=1e-6
            )


def test_repeated_blocks_are_the_layers_and_a_model_without_them_is_refused():
    model = tiny_llama()
    assert repeated_blocks(model) == list(model.model.layers)
    with pytest.raises(ValueError, match=r"Linear has no repeated blocks .* torch.compile"):
        compile_layers(torch.nn.Linear(2, 2))


def test_the_callback_compiles_the_layers_and_trains():
    import lightning as L

    from lightning_peft import AdapterConfigError, PeftCallback
    from tests.lightning_modules import CausalLM, token_data

    torch._dynamo.reset()
    module = CausalLM()
    module.model.config.use_cache = False
    callback = PeftCallback(LoRA(rank=4), compile_layers={"backend": "aot_eager"})
    trainer = L.Trainer(
        max_steps=3,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, token_data())
    layer = module.model.model.layers[0]
    assert layer._compiled_call_impl is not None  # nn.Module.compile's mark
    assert layer.self_attn.q_proj.lora_B["default"].weight.abs().sum() > 0  # it trained
    with pytest.raises(AdapterConfigError, match="compile_layers must be True, False, one of"):
        PeftCallback(compile_layers="fast")
