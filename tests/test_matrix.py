"""Every family x method cell of tests/matrix.py holds, and docs/methods.md shows that table."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

from tests import matrix

ROOT = Path(__file__).parent.parent
GUIDE = ROOT / "docs" / "methods.md"
DEMO = "Lightning demo transformer (nn.MultiheadAttention)"
# What each refusal is, and why it is right: no bias to train, no token input to prompt,
# no cache to prefix, not a transformers model (IA3 defaults, prompts and prefixes need one).
REFUSED = {
    ("Llama", "BitFit"): "TargetModulesError: BitFit found no bias",
    ("Mistral", "BitFit"): "TargetModulesError: BitFit found no bias",
    ("T5", "BitFit"): "TargetModulesError: BitFit found no bias",
    ("ViT", "Prompt"): "AdapterConfigError: PromptTuning puts virtual tokens before",
    ("ViT", "Prefix"): "AdapterConfigError: PrefixTuning puts its keys and values",
    ("Whisper", "Prompt"): "AdapterConfigError: PromptTuning puts virtual tokens before",
    (DEMO, "IA3"): "AdapterConfigError: IA3() picks its targets by model type",
    (DEMO, "Prompt"): "UnsupportedLayerError: PromptTuning needs a transformers model",
    (DEMO, "Prefix"): "UnsupportedLayerError: PrefixTuning needs a transformers model",
}
# PEFT's encoder-decoder prompt holds decoder rows its forward never reads (see
# adapters/prompt.py); here the prompt is the encoder's rows alone.
PEFT_COUNTS_DEAD_ROWS = {("T5", "Prompt")}
CELLS = [(family, method) for family in matrix.FAMILIES for method in matrix.METHODS]


@functools.cache
def cells() -> dict[tuple[str, str], matrix.Cell]:
    return matrix.all_cells()


@pytest.mark.parametrize(("family", "method"), CELLS, ids=[f"{f}-{m}" for f, m in CELLS])
def test_cell(family, method):
    cell = cells()[family, method]
    if lock_differs() and cell.refused and not cell.refused.startswith("failed"):
        pytest.skip(f"refused with these releases ({lock_differs()} differ): {cell.refused}")
    if (family, method) in REFUSED:
        assert cell.refused is not None and cell.refused.startswith(REFUSED[family, method])
        return
    assert cell.refused is None, cell.refused
    if cell.absent:
        assert method in ("LoRA on embeddings", "LoRA on convolutions")
        return
    if matrix.METHODS[method].identity:
        assert cell.identity, "the adapted model does not start equal to its base"
    assert cell.all_grads, "some adapter tensor got no gradient"
    assert cell.loss_after < cell.loss_before
    same_peft = not lock_differs()  # other PEFT releases count heads and layers otherwise
    if (
        same_peft
        and cell.peft_trainable is not None
        and (family, method) not in PEFT_COUNTS_DEAD_ROWS
    ):
        assert cell.trainable == cell.peft_trainable


def test_peft_counts_dead_rows_for_t5_prompts_only():
    if lock_differs():
        pytest.skip(f"PEFT's count is the lock's release's; {lock_differs()} differ")
    cell = cells()["T5", "Prompt"]
    assert cell.peft_trainable == 2 * cell.trainable


def lock_differs() -> list[str]:
    """The packages the matrix depends on whose installed version is not the lock's."""
    from importlib.metadata import version

    pins = dict(
        line.strip().split("==")
        for line in (ROOT / "requirements-lock.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    return [p for p in ("transformers", "peft", "torch") if version(p).split("+")[0] != pins[p]]


def test_the_methods_guide_shows_this_matrix():
    text = GUIDE.read_text()
    shown = re.search(r"<!-- matrix:start -->\n(.*?)<!-- matrix:end -->", text, re.S)
    assert shown is not None, "docs/methods.md lacks the matrix markers"
    table = matrix.table(cells())
    if lock_differs():
        # Other releases may count layers (or PEFT's heads) otherwise: what runs, what is
        # refused and what does not apply must still be what the guide says.
        assert outcomes(shown.group(1)) == outcomes(table), "regenerate: python tests/matrix.py"
    else:
        assert shown.group(1) == table, "regenerate it: python tests/matrix.py"


def outcomes(table: str) -> list[list[str]]:
    """Each cell of a matrix table reduced to ✓, refused or – (counts left out)."""
    rows = [line.strip("|").split(" | ") for line in table.strip().splitlines()[2:]]
    return [[row[0]] + [cell.split(" ")[0] for cell in row[1:]] for row in rows]
