"""The head a transformers task class adds on top of its pretrained backbone.

``BertForSequenceClassification.from_pretrained`` loads BERT and starts ``classifier`` at
random. With adapters elsewhere and that head frozen the model cannot learn its task: prompt
tuning on BERT then learns nothing, and LoRA learns through a random projection. Hugging Face
PEFT trains such heads when told the task (``modules_to_save``); ``apply_adapters`` trains
them by default (``train_head=False`` keeps them frozen).

A head is what the task class holds beside its backbone (``model.bert``, ``model.vit``,
``model.model``): ``classifier``, ``score``, ``qa_outputs``. Language-model heads are not
task heads: they come pretrained (often tied to the input embeddings).
"""

from __future__ import annotations

import re

from torch import nn

from lightning_peft.adapters.bitfit import Unfreeze
from lightning_peft.protocol import trained_marks
from lightning_peft.quantization.layers import task_head_names as task_heads_among
from lightning_peft.targeting import candidate_modules


def task_head_names(model: nn.Module) -> list[str]:
    """Full names, in ``model``, of the modules a transformers task class adds on top of its
    backbone (``["classifier"]`` for BERT, ``["score"]`` for Llama); ``[]`` for models
    without one (causal or seq2seq language models, plain modules)."""
    return task_heads_among(candidate_modules(model))


def head_to_train(model: nn.Module, selected: set[str]) -> Unfreeze | None:
    """An ``Unfreeze`` of ``model``'s task heads that no config in hand already covers:
    ``selected`` holds the module names the other configs select (a head a config wraps or
    unfreezes itself is left to it), and a head some adapter already trains stays with it."""
    heads = [
        name
        for name in task_head_names(model)
        if not any(s == name or s.startswith(name + ".") for s in selected)
        and not any(trained_marks(m) for m in model.get_submodule(name).modules())
    ]
    if not heads:
        return None
    return Unfreeze(target_modules="|".join(re.escape(name) for name in heads))
