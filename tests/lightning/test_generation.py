"""GenerationSamples: completions after each validation, equal to generate, changing nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_peft import AdapterCheckpoint, AdapterConfigError, PeftCallback
from lightning_peft.lightning.generation import GenerationSamples
from tests.lightning_modules import QV_LORA, CausalLM, fit, token_data

PROMPTS = [[5, 6, 7, 8], [100, 101]]


def test_completions_are_what_generate_gives_with_the_adapters_on(tmp_path, capsys):
    module = CausalLM()
    samples = GenerationSamples(PROMPTS, max_new_tokens=4)
    fit(module, tmp_path, 3, [PeftCallback(QV_LORA), samples], val_data=token_data(4))
    # The step loggers record validation 3 steps in under (Lightning counts 2 before it).
    assert [s["step"] for s in samples.samples] == [2, 2]
    module.model.eval()
    with torch.no_grad():
        for prompt, sample in zip(PROMPTS, samples.samples, strict=True):
            ids = torch.tensor([prompt])
            expected = module.model.generate(ids, max_new_tokens=4, do_sample=False)[
                0, len(prompt) :
            ]
            assert sample["output_ids"] == expected.tolist()
    out = capsys.readouterr().out
    assert "[step 2] [5, 6, 7, 8] -> " in out  # no text logger here: the console


def test_a_run_with_samples_resumes_exactly_and_sampling_draws_nothing_training_sees(tmp_path):
    def samples():
        return GenerationSamples(PROMPTS, max_new_tokens=3, generate_kwargs={"do_sample": True})

    plain = fit(CausalLM(), tmp_path / "a", 6, [PeftCallback(QV_LORA)], val_data=token_data(4))
    sampled = fit(
        CausalLM(), tmp_path / "b", 6, [PeftCallback(QV_LORA), samples()], val_data=token_data(4)
    )
    assert sampled.losses == plain.losses
    saver = AdapterCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    fit(
        CausalLM(),
        tmp_path / "c",
        3,
        [PeftCallback(QV_LORA), saver, samples()],
        val_data=token_data(4),
    )
    resumed = fit(
        CausalLM(),
        tmp_path / "d",
        6,
        [PeftCallback(QV_LORA), samples()],
        val_data=token_data(4),
        ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt"),
    )
    assert resumed.losses == plain.losses[3:]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompts": []}, r"needs a list of prompts, got \[\]"),
        ({"prompts": "hello"}, r"needs a list of prompts, got 'hello'"),
        ({"prompts": ["hi"], "max_new_tokens": 0}, r"max_new_tokens must be a positive int, got 0"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(AdapterConfigError, match=message):
        GenerationSamples(**kwargs)


def test_text_prompts_without_a_tokenizer_are_refused_before_training(tmp_path):
    module = CausalLM()
    steps = []
    module.on_train_batch_start = lambda batch, index: steps.append(index)
    with pytest.raises(
        AdapterConfigError, match=r"text prompts \('Hello'\) but finds no tokenizer"
    ):
        fit(module, tmp_path, 2, [PeftCallback(QV_LORA), GenerationSamples(["Hello"])])
    assert steps == []  # said at setup, not after an epoch


def test_samples_go_beside_a_csv_log_under_the_step_of_its_validation_rows(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    samples = GenerationSamples(PROMPTS[:1], max_new_tokens=2)
    logger = CSVLogger(tmp_path)
    callbacks = [PeftCallback(QV_LORA), samples]
    options = dict(logger=logger, log_every_n_steps=1, val_check_interval=2)
    fit(
        CausalLM(),
        tmp_path,
        2,
        callbacks,
        val_data=token_data(4),
        num_sanity_val_steps=0,
        **options,
    )
    rows = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    val_steps = [
        r.split(",")[header.index("step")]
        for r in rows[1:]
        if r.split(",")[header.index("val_loss")]
    ]
    written = [
        json.loads(line)
        for line in (Path(logger.log_dir) / "samples.jsonl").read_text().splitlines()
    ]
    assert [str(line["step"]) for line in written] == val_steps == ["1"]
