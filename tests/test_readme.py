"""The Python blocks of the README and the guides under docs/ run as written, on a tiny Llama.

Each ```python block of a page runs in order, in one scratch folder per page (blocks leave
files for later ones on the same page, as a reader's session would; no page reads what
another page's blocks wrote), each with a fresh namespace holding what the pages say the
reader brings: ``module`` (a LightningModule), ``data`` (its DataLoader of token rows, a
``StatefulDataLoader`` as the quick start recommends), ``model`` (a transformers model with
a LoRA adapter), ``ids`` (a batch of token ids), and a model folder wherever the text says
``"path/to/model"``. A block that cannot run here says why in an HTML comment right above
it: ``<!-- not run: ... -->``. docs/extending.md builds one method across its blocks and
is run by tests/test_docs.py instead.
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

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md"] + [
    page for page in sorted((ROOT / "docs").glob("*.md")) if page.name != "extending.md"
]
FENCE = re.compile(r"(?:<!-- not run: (?P<why>[^>]*) -->\n)?```python\n(?P<code>.*?)```", re.S)


def python_blocks(page: Path) -> list[tuple[str, str | None, str]]:
    """``(heading, reason not run or None, code)`` for every Python block of a page, in order."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        headings = re.findall(r"^#{2,} (.+)$", text[: match.start()], re.M)
        assert headings, f"{page.name}: a Python block before the page's first ## heading"
        blocks.append((headings[-1], match.group("why"), match.group("code")))
    return blocks


BLOCKS = [
    (page.relative_to(ROOT).as_posix(), index, *block)
    for page in PAGES
    for index, block in enumerate(python_blocks(page))
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory):
    """One scratch folder per page, each with the tiny Llama saved in it."""
    folders: dict[str, Path] = {}

    def folder(page: str) -> Path:
        if page not in folders:
            root = tmp_path_factory.mktemp(page.replace("/", "-").removesuffix(".md"))
            tiny_llama().save_pretrained(root / "tiny-llama")
            folders[page] = root
        return folders[page]

    return folder


def reader_namespace() -> dict:
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


def test_the_pages_have_python_blocks_and_say_why_one_is_not_run():
    assert len(BLOCKS) >= 8
    assert all(why is None or why.strip() for *_, why, _ in BLOCKS)


@pytest.mark.parametrize(
    ("page", "index", "heading"),
    [(page, index, heading) for page, index, heading, _, _ in BLOCKS],
    ids=[f"{page}-{index}-{heading}" for page, index, heading, _, _ in BLOCKS],
)
def test_block_runs(page, index, heading, scratch, monkeypatch):
    (why, code) = next(b[3:] for b in BLOCKS if b[0] == page and b[1] == index)
    if why is not None:
        pytest.skip(f"{page} says: not run: {why}")
    folder = scratch(page)
    monkeypatch.chdir(folder)
    L.seed_everything(0, verbose=False)
    code = code.replace('"path/to/model"', repr(str(folder / "tiny-llama")))
    # Lightning's progress bars and summaries are noise here; what the block does is kept.
    monkeypatch.setattr(L.Trainer, "__init__", _quiet(L.Trainer.__init__))
    exec(compile(code, f"{page} block {index} ({heading})", "exec"), reader_namespace())


def _quiet(init):
    def quiet_init(self, *args, **kwargs):
        kwargs.setdefault("enable_progress_bar", False)
        kwargs.setdefault("enable_model_summary", False)
        kwargs.setdefault("logger", False)
        kwargs.setdefault("accelerator", "cpu")
        init(self, *args, **kwargs)

    return quiet_init
