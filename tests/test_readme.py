"""The README's Python blocks run as written, on a tiny Llama.

Each ```python block of README.md runs in order, in one scratch folder (blocks leave files
for later ones, as a reader's session would), each with a fresh namespace holding what the
README says the reader brings: ``module`` (a LightningModule), ``data`` (its DataLoader of
token rows, a ``StatefulDataLoader`` as the README recommends), ``model`` (a transformers
model with a LoRA adapter), ``ids`` (a batch of token ids), and a model folder wherever
the text says ``"path/to/model"``. A block that cannot run here says why in an HTML
comment right above it: ``<!-- not run: ... -->``.
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_peft import LoRA, apply_adapters
from tests.lightning_modules import CausalLM, token_data
from tests.tiny_models import VOCAB, tiny_llama

README = Path(__file__).parent.parent / "README.md"
FENCE = re.compile(r"(?:<!-- not run: (?P<why>[^>]*) -->\n)?```python\n(?P<code>.*?)```", re.S)


def python_blocks() -> list[tuple[str, str | None, str]]:
    """``(heading, reason not run or None, code)`` for every Python block, in order."""
    text = README.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        headings = re.findall(r"^#{2,} (.+)$", text[: match.start()], re.M)
        blocks.append((headings[-1], match.group("why"), match.group("code")))
    return blocks


BLOCKS = python_blocks()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    tiny_llama().save_pretrained(root / "tiny-llama")
    return root


def reader_namespace(model_folder: Path) -> dict:
    model = tiny_llama()
    apply_adapters(model, LoRA(rank=4, target_modules=["q_proj", "v_proj"]))
    return {
        "L": L,
        "torch": torch,
        "module": CausalLM(),
        "data": token_data(stateful=True),
        "model": model,
        "ids": torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(3)),
        "__name__": "__readme__",
    }


def test_the_readme_has_python_blocks_and_says_why_one_is_not_run():
    assert len(BLOCKS) >= 8
    assert all(why is None or why.strip() for _, why, _ in BLOCKS)


@pytest.mark.parametrize(
    ("index", "heading"), [(i, heading) for i, (heading, _, _) in enumerate(BLOCKS)]
)
def test_readme_block_runs(index, heading, scratch, monkeypatch):
    _, why, code = BLOCKS[index]
    if why is not None:
        pytest.skip(f"README says: not run: {why}")
    monkeypatch.chdir(scratch)
    L.seed_everything(0, verbose=False)
    code = code.replace('"path/to/model"', repr(str(scratch / "tiny-llama")))
    # Lightning's progress bars and summaries are noise here; what the block does is kept.
    monkeypatch.setattr(L.Trainer, "__init__", _quiet(L.Trainer.__init__))
    exec(compile(code, f"README.md block {index} ({heading})", "exec"), reader_namespace(scratch))


def _quiet(init):
    def quiet_init(self, *args, **kwargs):
        kwargs.setdefault("enable_progress_bar", False)
        kwargs.setdefault("enable_model_summary", False)
        kwargs.setdefault("logger", False)
        kwargs.setdefault("accelerator", "cpu")
        init(self, *args, **kwargs)

    return quiet_init
