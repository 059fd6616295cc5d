"""Ctrl-C (SIGINT) and preemption (SIGTERM) sent to a real ``lightning-peft fit`` leave an
adapter-only checkpoint, and ``--ckpt_path`` resumes from it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # four command-line runs, ~10 s of imports each

ROOT = Path(__file__).parents[1]

CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: {max_steps}
  logger: false
  enable_progress_bar: false
  log_every_n_steps: 1
  enable_model_summary: false
  callbacks:
    - class_path: lightning_peft.PeftCallback
      init_args:
        adapters:
          class_path: lightning_peft.LoRA
          init_args: {{rank: 4, target_modules: [q_proj, v_proj]}}
    - class_path: lightning_peft.AdapterCheckpoint
      init_args: {{dirpath: {checkpoints}, every_n_train_steps: 1000}}
model:
  class_path: tests.lightning_modules.SlowCausalLM
  init_args: {{progress: {progress}, delay: {delay}}}
data:
  class_path: tests.lightning_modules.TokenData
"""


def start(tmp_path: Path, max_steps: int, delay: float, *extra: str) -> subprocess.Popen:
    config = tmp_path / f"run{max_steps}.yaml"
    config.write_text(
        CONFIG.format(
            max_steps=max_steps,
            checkpoints=tmp_path / "checkpoints",
            progress=tmp_path / "progress",
            delay=delay,
        )
    )
    command = [sys.executable, "-m", "lightning_peft.lightning.cli", "fit", "--config", str(config)]
    return subprocess.Popen(
        [*command, *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    """A shell's background job (`make test &`, CI runners) starts with SIGINT ignored, and
    children inherit that: the run under test gets Ctrl-C's default, as in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def steps_taken(tmp_path: Path) -> int:
    progress = tmp_path / "progress"
    return int(progress.read_text() or 0) if progress.exists() else 0


@pytest.mark.parametrize(("sent", "exit_code"), [(signal.SIGINT, 1), (signal.SIGTERM, 0)])
def test_an_interrupted_run_leaves_a_checkpoint_that_resumes(tmp_path, sent, exit_code):
    run = start(tmp_path, max_steps=500, delay=0.3)
    deadline = time.monotonic() + 180
    while steps_taken(tmp_path) < 3:
        assert run.poll() is None, run.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the run took no 3 steps in 180 s"
        time.sleep(0.2)
    run.send_signal(sent)
    output, _ = run.communicate(timeout=120)
    assert run.returncode == exit_code, output[-3000:]
    checkpoint = tmp_path / "checkpoints" / "interrupted.ckpt"
    assert checkpoint.is_file(), output[-3000:]
    assert f"saved {checkpoint}" in output and "resume with" in output
    # Only what concerns the run: no library's advertisement, fallback note or deprecation.
    for noise in ("Tip:", "kernels-community", "LeafSpec"):
        assert noise not in output, noise
    # Its output is no terminal: lightning-peft fit added a progress line a step.
    assert re.search(r"^step 2/500  loss \d+\.\d{4}  lr ", output, re.MULTILINE), output[-3000:]
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["state_dict"] and all("lora_" in key for key in saved["state_dict"])  # adapters
    stopped_at = saved["global_step"]
    assert stopped_at >= 3

    resumed = start(tmp_path, stopped_at + 2, 0.0, "--ckpt_path", str(checkpoint))
    output, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, output[-3000:]
    assert steps_taken(tmp_path) == stopped_at + 2  # went on from the step it stopped at
