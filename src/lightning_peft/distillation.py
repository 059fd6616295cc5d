"""Knowledge distillation (Hinton et al. 2015; DistilBERT, Sanh et al. 2019): a student
learns the teacher's predicted distribution, not only the labels.

    kd_loss = T² · KL( softmax(teacher / T) ‖ softmax(student / T) )

summed over classes and averaged over examples (or over the unmasked tokens of a language
model). The temperature ``T`` softens both distributions so the student sees how the teacher
ranks the wrong answers too; ``T²`` keeps the gradient's scale the same across temperatures.
:func:`shrink` builds DistilBERT's student: the teacher with every other layer kept.
The Lightning side is :class:`lightning_peft.Distillation`, a callback.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_peft.errors import AdapterConfigError

# The class-name endings of the modules a transformers model stacks into its layer lists.
_LAYER_SUFFIXES = ("Layer", "Block")
# Config fields that may hold an encoder-decoder's stack depths, by family.
_DECODER_DEPTH = ("decoder_layers", "num_decoder_layers")
_ENCODER_DEPTH = ("encoder_layers", "num_layers", "num_hidden_layers")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, a scalar.

    Args:
        student_logits, teacher_logits: ``(..., classes)``, the same shape.
        temperature: ``T > 0``.
        mask: ``student_logits.shape[:-1]``, true (or 1) where a position counts (an
            attention mask, say); the loss is averaged over those positions. Default: every
            position counts.

    Raises:
        AdapterConfigError: shapes that differ (another vocabulary or label count) or a
            temperature that is not a positive number.
        FloatingPointError: NaN or +inf teacher logits.
    """
    if student_logits.shape != teacher_logits.shape:
        raise AdapterConfigError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: distillation needs the same vocabulary "
            "(or label count) and the same inputs"
        )
    if not is_temperature(temperature):
        raise AdapterConfigError(
            f"temperature must be a positive finite number, got {temperature!r}"
        )
    bad = torch.isnan(teacher_logits) | torch.isposinf(teacher_logits)
    if bad.any():
        # A NaN or +inf teacher makes every term NaN or drops it; the mean would read 0.0.
        raise FloatingPointError(
            f"teacher logits are not finite: {int(bad.sum())} of {teacher_logits.numel()} "
            "values are NaN or +inf (-inf, a class the teacher rules out, is allowed): the "
            "teacher is broken or overflowed its dtype"
        )
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    # KL(t || s) per position, summed over classes; classes the teacher rules out (-inf
    # logits, probability 0) contribute 0, not 0 * inf
    terms = teacher.exp() * (teacher - student)
    per_position = torch.where(teacher > -math.inf, terms, 0.0).sum(-1)
    if mask is None:
        loss = per_position.mean()
    else:
        if mask.shape != per_position.shape:
            raise AdapterConfigError(
                f"mask has shape {tuple(mask.shape)}, the logits' positions "
                f"{tuple(per_position.shape)}"
            )
        weight = mask.to(per_position.dtype)
        loss = (per_position * weight).sum() / weight.sum().clamp(min=1)
    return loss * temperature**2


def is_temperature(value: object) -> bool:
    """A positive finite number (not a bool)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def layer_stacks(model: nn.Module) -> dict[str, nn.ModuleList]:
    """The layer lists of a transformers model by name (``model.layers``, ``transformer.h``,
    ``bert.encoder.layer``, ``encoder.block`` and ``decoder.block``): module lists of
    ``...Layer`` / ``...Block`` modules not nested in another such list."""
    stacks: dict[str, nn.ModuleList] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        if any(name.startswith(f"{outer}.") for outer in stacks):
            continue
        if all(type(m).__name__.endswith(_LAYER_SUFFIXES) for m in module):
            stacks[name] = module
    return stacks


def shrink(
    model: nn.Module, keep: Literal["every-other"] | Sequence[int] = "every-other"
) -> nn.Module:
    """A copy of ``model`` with only some of its layers: DistilBERT's student initialisation.

    Args:
        model: a transformers model (Llama-like, GPT-2, BERT, RoBERTa, T5, ...); left as it is.
        keep: ``"every-other"`` (layers 0, 2, 4, ...) or the layer indices to keep, applied
            to every layer stack (T5's encoder and decoder each).

    Returns:
        A new model: each kept layer identical to its source (weights copied), the config's
        depth (and per-layer fields such as ``layer_types``) updated and the layers' cache
        indices renumbered, ready for ``save_pretrained``.

    Raises:
        AdapterConfigError: no layer stack found, or a ``keep`` that is empty, repeats, is out
            of range, or drops T5's block 0 (which holds the position bias).
    """
    stacks = layer_stacks(model)
    if not stacks:
        raise AdapterConfigError(
            f"shrink finds no layer stack in {type(model).__name__} (a ModuleList of ...Layer "
            "or ...Block modules)"
        )
    plans = {}
    for name, stack in stacks.items():
        depth = len(stack)
        if isinstance(keep, str) and keep != "every-other":
            raise AdapterConfigError(
                f"keep must be 'every-other' or a list of indices, got {keep!r}"
            )
        kept = list(range(0, depth, 2)) if keep == "every-other" else list(keep)
        if (
            not kept
            or len(set(kept)) != len(kept)
            or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < depth for i in kept
            )
        ):
            raise AdapterConfigError(
                f"keep must be distinct layer indices in [0, {depth}) for {name}, got {keep!r}"
            )
        holds_bias = any(
            getattr(m, "has_relative_attention_bias", False) for m in stack[0].modules()
        )
        if holds_bias and 0 not in kept:
            raise AdapterConfigError(
                f"{name}: layer 0 holds the relative position bias the others use (T5); keep "
                "must include 0"
            )
        plans[name] = sorted(kept)
    student = copy.deepcopy(model)
    config = getattr(student, "config", None)
    for name, kept in plans.items():
        layer_stack: Any = student.get_submodule(name)  # a ModuleList of layers
        old_depth = len(layer_stack)
        layers = [layer_stack[i] for i in kept]
        for index, layer in enumerate(layers):
            for module in layer.modules():  # the key/value cache is indexed by layer
                if isinstance(getattr(module, "layer_idx", None), int):
                    vars(module)["layer_idx"] = index
        parent_name, _, child = name.rpartition(".")
        setattr(student.get_submodule(parent_name), child, nn.ModuleList(layers))
        if config is not None:
            _update_depth(config, name, old_depth, kept)
    return student


def _update_depth(config: Any, stack: str, old_depth: int, kept: list[int]) -> None:
    """Set the config fields that hold this stack's depth: every candidate for its kind
    (decoder, encoder, or the one stack) that still says ``old_depth``: BART and Whisper
    write ``encoder_layers``/``decoder_layers``, T5 ``num_layers``/``num_decoder_layers``,
    the rest ``num_hidden_layers``."""
    fields: tuple[str, ...]
    if "decoder" in stack:
        fields = _DECODER_DEPTH
    elif "encoder" in stack and getattr(config, "is_encoder_decoder", False):
        fields = _ENCODER_DEPTH
    else:
        fields = ("num_hidden_layers",)
    updated = False
    for field in fields:
        if getattr(config, field, None) == old_depth:
            setattr(config, field, len(kept))
            updated = True
    if not updated:
        raise AdapterConfigError(
            f"shrink cannot tell which field of {type(config).__name__} holds the depth of "
            f"{stack} ({old_depth} layers; looked at {', '.join(fields)}): the shrunk model "
            "would load with the old depth"
        )
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == old_depth:
        config.layer_types = [layer_types[i] for i in kept]
