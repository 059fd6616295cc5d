"""The T-Few losses and rank classification against values computed by hand (§3.2)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_peft.tfew import choice_log_probs, length_normalized_scores, tfew_losses
from lightning_peft.tfew_metric import RankClassificationAccuracy

# One example, two choices, vocabulary of 3. Row 0 is x + the correct choice (tokens 2, 0),
# row 1 is x + the incorrect one (token 1, then padding). Position t predicts token t + 1.
PROBS = torch.tensor(
    [
        [[0.2, 0.3, 0.5], [0.6, 0.2, 0.2], [1 / 3, 1 / 3, 1 / 3]],
        [[0.1, 0.8, 0.1], [0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3]],
    ]
)
LABELS = torch.tensor([[-100, 2, 0], [-100, 1, -100]])
CORRECT = torch.tensor([0])


def test_losses_match_the_papers_formulas():
    losses = tfew_losses(PROBS.log(), LABELS, CORRECT, num_choices=2)
    beta_correct = (math.log(0.5) + math.log(0.6)) / 2
    beta_wrong = math.log(0.8)  # one token: normalized by its own length
    assert losses.lm.item() == pytest.approx(-beta_correct, rel=1e-6)
    assert losses.unlikelihood.item() == pytest.approx(-math.log(1 - 0.8), rel=1e-6)
    expected_ln = -math.log(
        math.exp(beta_correct) / (math.exp(beta_correct) + math.exp(beta_wrong))
    )
    assert losses.length_normalized.item() == pytest.approx(expected_ln, rel=1e-6)
    assert losses.total.item() == pytest.approx(
        -beta_correct - math.log(0.2) + expected_ln, rel=1e-6
    )
    torch.testing.assert_close(losses.scores, torch.tensor([[beta_correct, beta_wrong]]))


def test_unlikelihood_averages_over_all_incorrect_tokens():
    labels = torch.tensor([[-100, 2, 0], [-100, 1, 1]])  # the wrong choice now has two tokens
    losses = tfew_losses(PROBS.log(), labels, CORRECT, num_choices=2)
    assert losses.unlikelihood.item() == pytest.approx(
        -(math.log(1 - 0.8) + math.log(1 - 0.5)) / 2, rel=1e-6
    )


def test_gradients_push_the_correct_choice_up_and_the_wrong_one_down():
    logits = PROBS.log().clone().requires_grad_(True)
    tfew_losses(logits, LABELS, CORRECT, num_choices=2).total.backward()
    assert logits.grad[0, 0, 2] < 0  # raising the correct token's logit lowers the loss
    assert logits.grad[1, 0, 1] > 0  # raising the wrong token's logit raises it


def test_rank_classification_picks_the_highest_length_normalized_score():
    log_probs, mask = choice_log_probs(PROBS.log(), LABELS, num_choices=2)
    scores = length_normalized_scores(log_probs, mask)
    metric = RankClassificationAccuracy()
    metric.update(scores, CORRECT)  # choice 1 scores higher: a miss
    metric.update(torch.tensor([[0.1, -2.0], [-1.0, -0.5]]), torch.tensor([0, 1]))  # two hits
    assert metric.compute().item() == pytest.approx(2 / 3)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"C=3 choices per example"):
        tfew_losses(PROBS.log(), LABELS, CORRECT, num_choices=3)
    with pytest.raises(ValueError, match=r"scores must be \(B, C\) and correct \(B,\)"):
        RankClassificationAccuracy().update(torch.zeros(4), torch.zeros(4, dtype=torch.long))
