"""The README's serving command on a real model: SmolLM2-135M-Instruct with two LoRA
adapters saved as PEFT folders that name it as their base (``--base`` left out), text
prompts in, text out, choices scored; each answer what that adapter alone gives."""

from __future__ import annotations

import pytest
import torch

from lightning_peft import LoRA, apply_adapters, load_peft, save_peft
from tests.serving.adapters_on_disk import call, serving
from tests.tolerances import reordering_tolerance

pytest.importorskip("litserve")
pytestmark = pytest.mark.slow  # reads SmolLM2 from its asset package

PROMPT = "Review: a gorgeous, witty film\nSentiment:"
CHOICES = [" negative", " positive"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from lightning_peft.data import load_smollm2

    root = tmp_path_factory.mktemp("smollm2-adapters")
    for seed, name in enumerate(("kind", "harsh")):
        model, _ = load_smollm2()
        apply_adapters(model, LoRA(rank=4, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for module in model.modules():
                if hasattr(module, "lora_B"):
                    generator = torch.Generator().manual_seed(seed)
                    weight = module.lora_B["default"].weight
                    weight.copy_(0.05 * torch.randn(weight.shape, generator=generator))
        save_peft(model, root / name, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    return root


def local(root, adapter, tokenizer):
    """Generation and choice scores of that adapter alone, with plain transformers calls."""
    from lightning_peft.data import load_smollm2

    model, _ = load_smollm2()
    load_peft(model, root / adapter)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
        )
        scores = []
        for choice in CHOICES:
            tokens = tokenizer(choice, add_special_tokens=False)["input_ids"]
            logits = model(torch.cat([ids, torch.tensor([tokens])], dim=1)).logits[0]
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            at = torch.arange(ids.shape[1] - 1, ids.shape[1] - 1 + len(tokens))
            scores.append(log_probs[at, torch.tensor(tokens)].sum().item())
    return out[0, ids.shape[1] :].tolist(), scores


def test_serve_from_peft_folders_that_name_their_base(adapters):
    from lightning_peft.data import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    with serving(
        [f"--adapter=kind={adapters / 'kind'}", f"--adapter=harsh={adapters / 'harsh'}"]
    ) as url:
        for adapter in ("kind", "harsh"):
            output_ids, scores = local(adapters, adapter, tokenizer)
            status, answer = call(
                url + "/predict",
                "POST",
                {"adapter": adapter, "prompt": PROMPT, "max_new_tokens": 6},
            )
            assert status == 200
            assert answer["output_ids"] == output_ids
            assert answer["text"] == tokenizer.decode(output_ids, skip_special_tokens=True)
            status, ranked = call(
                url + "/predict", "POST", {"adapter": adapter, "prompt": PROMPT, "choices": CHOICES}
            )
            assert status == 200 and ranked["text"] == CHOICES[ranked["choice"]]
            expected = torch.tensor(scores)
            torch.testing.assert_close(  # 30 layers of width 576, batched as another row
                torch.tensor(ranked["scores"]),
                expected,
                **reordering_tolerance(expected, depth=30, width=576),
            )
