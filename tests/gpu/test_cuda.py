"""What only a GPU shows: bitsandbytes' CUDA kernels against its CPU path, QLoRA under CUDA
autocast resuming exactly with paged 8-bit optimizer state, checkpoint writers given CUDA
tensors, compiled layers with CUDA graphs, and serving on the GPU. ``make test-gpu`` runs
them (see ``conftest.py``)."""

from __future__ import annotations

import copy

import bitsandbytes.functional as bnbF
import pytest
import torch

import lightning_peft
from lightning_peft import (
    AdapterCheckpoint,
    LoRA,
    PeftPrecision,
    adapter_state_dict,
    apply_adapters,
)
from lightning_peft.compiling import compile_layers
from lightning_peft.lightning.checkpoint_io import AtomicCheckpointIO
from tests.lightning_modules import CausalLM, fit
from tests.tiny_models import VOCAB, tiny_llama

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("mode", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [False, True], ids=["single", "double-quant"])
def test_cuda_dequantization_equals_the_cpu_paths_on_the_same_codes(mode, double, device):
    weight = torch.randn(256, 192, generator=torch.Generator().manual_seed(0))
    codes, state = bnbF.quantize_4bit(
        weight, blocksize=64, quant_type=mode, compress_statistics=double
    )
    on_cpu = bnbF.dequantize_4bit(codes, copy.deepcopy(state))
    moved = copy.deepcopy(state)
    moved.to(device)
    on_device = bnbF.dequantize_4bit(codes.to(device), moved)
    # The same codes times the same float32 scales: equal, not close.
    torch.testing.assert_close(on_device.cpu(), on_cpu, rtol=0, atol=0)


def test_qlora_under_bf16_autocast_resumes_exactly_with_paged_8bit_state(device, tmp_path):
    def plugin() -> PeftPrecision:
        return PeftPrecision(
            "nf4-lora",
            "bf16-mixed",
            optimizer="paged_adamw_8bit",
            optimizer_kwargs={"min_8bit_size": 1},
        )

    options = dict(trainer_class=lightning_peft.Trainer, accelerator=device)
    straight = CausalLM()
    reference = fit(straight, tmp_path / "a", 6, [], plugins=[plugin()], **options)
    saver = AdapterCheckpoint(dirpath=tmp_path / "ckpt", filename="half", every_n_train_steps=3)
    fit(CausalLM(), tmp_path / "b", 3, [saver], plugins=[plugin()], **options)
    checkpoint = torch.load(tmp_path / "ckpt" / "half.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == set(adapter_state_dict(straight))  # adapters only
    state = checkpoint["optimizer_states"][0]["state"]
    # bitsandbytes saves its 8-bit state under one key per parameter.
    saved = [s.get("__bnb_optimizer_quant_state__", s) for s in state.values()]
    assert saved and all(s["state1"].dtype == torch.uint8 for s in saved)  # 8-bit
    resumed = CausalLM()
    second = fit(
        resumed,
        tmp_path / "c",
        6,
        [],
        ckpt_path=str(tmp_path / "ckpt" / "half.ckpt"),
        plugins=[plugin()],
        **options,
    )
    assert second.losses == reference.losses[3:]
    final, expected = adapter_state_dict(resumed), adapter_state_dict(straight)
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_the_atomic_writer_saves_device_tensors_and_they_load_back(device, tmp_path):
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    tensors = {"a": torch.randn(64, 8, device=device), "step": torch.tensor(3, device=device)}
    writer = AtomicCheckpointIO(TorchCheckpointIO())
    writer.save_checkpoint({"state_dict": tensors}, tmp_path / "x.ckpt")
    loaded = writer.load_checkpoint(tmp_path / "x.ckpt", map_location="cpu")["state_dict"]
    assert all(torch.equal(loaded[k], v.cpu()) for k, v in tensors.items())
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]  # no temporary file left


@pytest.mark.cuda_only
def test_layers_compiled_with_cuda_graphs_match_eager_across_steps():
    torch._dynamo.reset()
    eager = apply_adapters(tiny_llama(), LoRA(rank=4)).cuda().train()
    compiled = copy.deepcopy(eager)
    assert compile_layers(compiled, mode="reduce-overhead") == 2
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):  # graphs are recorded, then replayed: each step must still agree
        ids = torch.randint(0, VOCAB, (2, 10), generator=generator).cuda()
        for model, optimizer in zip((eager, compiled), optimizers, strict=True):
            optimizer.zero_grad()
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            optimizer.step()
        for name, param in eager.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(
                    compiled.get_parameter(name), param, rtol=1e-4, atol=1e-5
                )


@pytest.mark.cuda_only
def test_a_paged_optimizer_trains_a_batch_that_needs_paging(tmp_path):
    import bitsandbytes as bnb

    model = apply_adapters(tiny_llama().cuda(), LoRA(rank=4))
    optimizer = bnb.optim.PagedAdamW8bit(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, min_8bit_size=1
    )
    free, _ = torch.cuda.mem_get_info()
    # Hold all but 256 MiB of the GPU: the optimizer's paged state lives in unified memory.
    hold = torch.empty(max(free - 256 * 2**20, 0), dtype=torch.uint8, device="cuda")
    ids = torch.randint(0, VOCAB, (8, 64), device="cuda")
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    optimizer.step()
    del hold
    state = optimizer.state[next(iter(optimizer.state))]
    assert state["state1"].dtype == torch.uint8 and bool(state["state1"].is_paged)


def test_the_serving_engine_on_the_device_answers_as_generate(device, tmp_path):
    from lightning_peft.serving import AdapterEngine, Job

    tiny_llama(init_std=0.3).save_pretrained(tmp_path / "base")
    engine = AdapterEngine.from_pretrained(tmp_path / "base", device=device)
    model = tiny_llama(init_std=0.3).to(device)
    prompt = (5, 6, 7, 8)
    row = torch.tensor([prompt], device=device)
    expected = model.generate(
        row, attention_mask=torch.ones_like(row), max_new_tokens=6, do_sample=False, pad_token_id=0
    )[0, len(prompt) :].tolist()
    eos = model.generation_config.eos_token_id
    expected = expected[: expected.index(eos) + 1] if eos in expected else expected
    assert engine.run([Job(None, prompt, 6)])[0] == expected
