"""The examples run as the README shows them, so they never rot."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

from lightning_peft.lightning.cli import main as cli_main

EXAMPLES = Path(__file__).parent.parent / "examples"


def run_example(name: str, capsys, *args: str) -> str:
    argv, path = sys.argv, sys.path[:]
    sys.argv = [name, *args]
    sys.path.insert(0, str(EXAMPLES))  # the examples import their shared common.py
    try:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = argv, path
    return capsys.readouterr().out


def accuracy(label: str, out: str) -> float:
    return float(re.search(rf"{label}: +([0-9.]+)", out).group(1))


def test_quickstart_learns_the_rule_and_resumes_exactly(capsys):
    out = run_example("quickstart.py", capsys)
    assert accuracy("accuracy of the NF4 base", out) < 0.1
    assert accuracy("accuracy after", out) > 0.9
    assert "(identical)" in out


def test_plain_pytorch_example_learns_the_rule_and_survives_merging(capsys):
    out = run_example("plain_pytorch.py", capsys)
    assert accuracy("accuracy before", out) < 0.1
    assert accuracy("accuracy after", out) > 0.9 and accuracy("accuracy merged", out) > 0.9
    assert "merged 14 layers into the NF4 base" in out


# Each method's example on its real model, in its fast mode: 8 steps, 16 held-out reviews.
# The numbers a full run gives are in the README. So short a run moves the held-out accuracy
# of 16 reviews by less than its noise (a review is 0.06), in either direction; the loss on
# the reviews it trained on falls by more than 0.03 (measured: by 0.07 to 0.16).
METHOD_EXAMPLES = {
    "ia3_tfew.py": "(IA)^3 + T-Few losses",
    "prompt_tuning.py": "Prompt tuning",
    "prefix_tuning.py": "Prefix tuning",
    "bottleneck_adapters.py": "Bottleneck adapters",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", METHOD_EXAMPLES)
def test_method_example_learns_on_smollm2(name, capsys):
    out = run_example(name, capsys, "--fast")
    assert METHOD_EXAMPLES[name] in out
    before, after = accuracy("accuracy before", out), accuracy("accuracy after", out)
    assert 0.4 < before <= 1 and 0.4 < after <= 1  # far above chance, before and after
    seen = re.search(r"loss on 32 training reviews: ([0-9.]+) -> ([0-9.]+)", out)
    assert float(seen.group(2)) < float(seen.group(1)) - 0.03  # it learned what it saw
    assert re.search(r"trainable: +[0-9,]+ of 13[4-7],[0-9,]+ parameters", out)  # 135M + adapters


@pytest.mark.slow
def test_bitfit_example_learns_topics_with_biases_and_a_head(capsys):
    out = run_example("bitfit.py", capsys, "--fast")
    assert accuracy("accuracy after", out) > accuracy("accuracy before", out) + 0.15
    assert re.search(r"trainable: +28,037 of 22,715,141", out)


@pytest.mark.slow
def test_demo_fine_tunes_smollm2_in_nf4_reports_and_resumes_from_the_command_line(
    capsys, tmp_path, monkeypatch
):
    out = run_example("demo.py", capsys, "--steps", "2", "--eval-size", "8", "--out", str(tmp_path))
    assert 0.4 < accuracy("accuracy before", out) <= 1 and 0 < accuracy("accuracy after", out) <= 1
    # It learns what it sees: the loss on its 16 training reviews falls (measured: by 0.09).
    seen = re.search(r"loss on 16 training reviews: ([0-9.]+) -> ([0-9.]+)", out)
    assert float(seen.group(2)) < float(seen.group(1)) - 0.03
    # The validation pass before training left NF4 with double quantization as it was.
    bits = float(re.search(r"bits/parameter: +([0-9.]+) for the 4-bit weights", out).group(1))
    assert 4.12 < bits <= 4.14
    assert re.search(r"optimizer: +bitsandbytes\.AdamW8bit \(8-bit state.*\): [0-9.]+ MiB", out)
    checkpoint = tmp_path / "checkpoints" / "sentiment.ckpt"
    assert checkpoint.exists()
    assert (tmp_path / "checkpoints" / "sentiment-peft" / "adapter_model.safetensors").exists()
    assert "where the time went" in out and "train" in out

    # The command it prints resumes its checkpoint (with the demo's data sizes).
    command = re.search(r"lightning-peft (fit .*)", out).group(1).split()
    assert command[-2:] == ["--trainer.max_steps", "22"]
    root = Path(__file__).parent.parent
    monkeypatch.chdir(tmp_path)  # the config's own checkpoints go under runs/
    command[command.index("--config") + 1] = str(root / command[command.index("--config") + 1])
    cli_main(
        [
            *command[:-1],
            "4",
            "--data.init_args.train_size",
            "16",
            "--data.init_args.eval_size",
            "8",
        ]
    )
    resumed = torch.load(tmp_path / "runs/cli/checkpoints/sentiment.ckpt", weights_only=True)
    assert resumed["global_step"] == 4  # went on from step 2


@pytest.mark.slow
def test_demo_with_loftq_reports_the_start_both_ways(capsys, tmp_path):
    args = ("--steps", "1", "--eval-size", "16", "--out", str(tmp_path), "--init", "loftq")
    out = run_example("demo.py", capsys, *args)
    base = accuracy("accuracy before", out)
    at_init = float(re.search(r"([0-9.]+) +\(NF4 base \+ LoftQ adapters at init\)", out).group(1))
    assert 0.4 < base <= 1 and 0.4 < at_init <= 1
    assert "lightning-peft fit" not in out  # the YAML's default adapters would not fit it


def test_multi_adapter_example_trains_two_tasks_in_mixed_batches(capsys):
    out = run_example("multi_adapter.py", capsys)
    scores = re.findall(r"counting up ([0-9.]+), counting down ([0-9.]+)", out)
    (base_up, base_down), (up_up, up_down), (down_up, down_down) = [
        tuple(map(float, s)) for s in scores
    ]
    assert base_up < 0.2 and base_down < 0.2
    assert up_up > 0.9 and up_down < 0.2 and down_down > 0.9 and down_up < 0.2
    assert accuracy("mixed batch", out) > 0.9


def test_mixin_example_reloads_an_adapter_checkpoint_exactly(capsys):
    out = run_example("mixin.py", capsys)
    assert "reloaded logits equal the trained module's: True" in out
    assert accuracy("next-token accuracy of the reloaded module", out) > 0.5


@pytest.mark.slow
def test_chat_example_trains_on_chat_rows_and_shows_samples(capsys):
    out = run_example("chat_sft.py", capsys, "--fast")
    assert "Chat SFT (QLoRA)" in out
    # Two steps teach the answer's form: the greedy answer starts with the label (measured:
    # none of 4 before, 4 of 4 after).
    assert accuracy("accuracy after", out) > accuracy("accuracy before", out)
    assert re.search(r"last samples: +\['.*', '.*'\]", out)  # GenerationSamples ran
