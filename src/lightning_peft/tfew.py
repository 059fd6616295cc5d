"""The T-Few recipe's losses and rank classification (Liu et al. 2022, §3.2).

A multiple-choice example ``x`` with answer choices ``y^(1..C)`` is scored by running the
model on ``x`` followed by each choice. From the per-token log-probabilities of the choice
tokens (:func:`choice_log_probs`), with ``y`` the correct choice and ``ŷ^(n)`` the
``N = C - 1`` incorrect ones:

    L_LM = -1/T(y) Σ_t log p(y_t | x, y_<t)
    L_UL = -Σ_n Σ_t log(1 - p(ŷ^(n)_t | x, ŷ^(n)_<t)) / Σ_n T(ŷ^(n))
    β(x, y) = 1/T(y) Σ_t log p(y_t | x, y_<t)                 (length-normalized score)
    L_LN = -log( exp β(x, y) / Σ_c exp β(x, y^(c)) )

and the recipe trains on ``L_LM + L_UL + L_LN``. Rank classification predicts the choice
with the highest ``β``. Over a batch each loss is a mean: of tokens for ``L_LM`` and
``L_UL`` (all correct / all incorrect choice tokens of the batch), of examples for ``L_LN``.

Shapes: ``B`` examples, ``C`` choices, ``T`` tokens; rows are example-major (row
``b · C + c`` is example ``b`` with choice ``c``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
_MIN_ONE_MINUS_P = 1e-6  # keeps log(1 - p) finite when the model is certain of a wrong token


class TFewLosses(NamedTuple):
    total: torch.Tensor
    lm: torch.Tensor
    unlikelihood: torch.Tensor
    length_normalized: torch.Tensor
    scores: torch.Tensor  # (B, C) length-normalized log-likelihoods β


def choice_log_probs(
    logits: torch.Tensor, labels: torch.Tensor, num_choices: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the choice tokens, for a causal LM.

    Args:
        logits: ``(B · C, T, V)`` from the model on each ``x + choice`` row.
        labels: ``(B · C, T)`` the row's token ids at choice positions, ``-100`` elsewhere
            (the prompt, padding), as for the model's own loss.
        num_choices: ``C``.

    Returns:
        ``(log_probs, mask)``, both ``(B, C, T - 1)``: ``log p`` of each label token given
        what precedes it (position ``t`` predicts token ``t + 1``), and where a label is.
    """
    rows = logits.shape[0]
    if rows % num_choices or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must be "
            f"(B·C, T, V) and (B·C, T) with C={num_choices} choices per example"
        )
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    shape = (rows // num_choices, num_choices, -1)
    return (picked * mask).view(shape), mask.view(shape)


def length_normalized_scores(log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``β``: the mean log-probability of each choice's tokens, ``(B, C)``."""
    return (log_probs * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def lm_loss(log_probs: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """``L_LM`` over the correct choices' tokens."""
    chosen = _choice_rows(log_probs, correct), _choice_rows(mask, correct)
    return -(chosen[0] * chosen[1]).sum() / chosen[1].sum().clamp(min=1)


def unlikelihood_loss(
    log_probs: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor
) -> torch.Tensor:
    """``L_UL``: pushes down the probability of every token of every incorrect choice."""
    wrong = torch.ones(mask.shape[:2], dtype=torch.bool, device=mask.device)
    wrong[torch.arange(len(correct)), correct] = False
    wrong_mask = mask & wrong.unsqueeze(-1)
    one_minus_p = (1 - log_probs.exp()).clamp(min=_MIN_ONE_MINUS_P)
    return -(torch.log(one_minus_p) * wrong_mask).sum() / wrong_mask.sum().clamp(min=1)


def length_normalized_loss(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """``L_LN``: softmax cross-entropy over the choices' length-normalized scores."""
    return F.cross_entropy(scores, correct)


def tfew_losses(
    logits: torch.Tensor, labels: torch.Tensor, correct: torch.Tensor, num_choices: int
) -> TFewLosses:
    """All of the recipe's losses from one forward pass over every ``x + choice`` row.

    In a ``training_step``: ``return tfew_losses(model(ids).logits, labels, y, C).total``.
    """
    log_probs, mask = choice_log_probs(logits, labels, num_choices)
    scores = length_normalized_scores(log_probs, mask)
    lm = lm_loss(log_probs, mask, correct)
    unlikelihood = unlikelihood_loss(log_probs, mask, correct)
    length_normalized = length_normalized_loss(scores, correct)
    return TFewLosses(
        lm + unlikelihood + length_normalized, lm, unlikelihood, length_normalized, scores
    )


def _choice_rows(values: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    return values[torch.arange(len(choice), device=values.device), choice]  # (B, T)
