"""Metrics of the real tasks against reference implementations (scikit-learn, the SQuAD v1.1 script)."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn import metrics as sk

from metalr.tasks.datasets import metrics


@pytest.mark.parametrize("num_classes", [2, 4])
def test_precision_recall_f1_match_sklearn(num_classes: int) -> None:
    g = torch.Generator().manual_seed(num_classes)
    labels = torch.randint(num_classes, (200,), generator=g)
    predictions = torch.where(
        torch.rand(200, generator=g) < 0.6, labels, torch.randint(num_classes, (200,), generator=g)
    )
    ours = metrics.precision_recall_f1(predictions, labels, num_classes)
    assert ours["macro_f1"] == pytest.approx(sk.f1_score(labels, predictions, average="macro"))
    assert ours["macro_precision"] == pytest.approx(
        sk.precision_score(labels, predictions, average="macro", zero_division=0)
    )
    assert ours["macro_recall"] == pytest.approx(sk.recall_score(labels, predictions, average="macro"))
    if num_classes == 2:
        assert ours["f1"] == pytest.approx(sk.f1_score(labels, predictions))
        assert ours["precision"] == pytest.approx(sk.precision_score(labels, predictions))
        assert ours["recall"] == pytest.approx(sk.recall_score(labels, predictions))


def test_never_predicted_class_scores_zero() -> None:
    out = metrics.precision_recall_f1(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 0, 1]), 2)
    assert out["precision"] == out["recall"] == out["f1"] == 0.0


def test_auc_matches_sklearn_with_ties() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(2, (300,), generator=g)
    scores = (labels.float() + torch.randn(300, generator=g)).round(decimals=1)  # many ties
    assert metrics.binary_auc(scores, labels) == pytest.approx(sk.roc_auc_score(labels, scores))
    assert math.isnan(metrics.binary_auc(scores, torch.ones(300, dtype=torch.long)))


def test_classification_summary_uses_positive_margin() -> None:
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 0.5], [3.0, 0.0]])
    out = metrics.classification_summary(logits, torch.tensor([1, 0, 0, 0]))
    assert out["auc"] == pytest.approx(1.0) and out["recall"] == 1.0 and out["precision"] == 0.5


def test_squad_normalisation_and_scores() -> None:
    # Examples of the official evaluate-v1.1.py behaviour.
    assert metrics.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert metrics.exact_match("the eiffel tower", ["Eiffel Tower", "Paris"]) == 1.0
    assert metrics.exact_match("tower", ["Eiffel Tower"]) == 0.0
    assert metrics.token_f1("eiffel tower in paris", ["Eiffel Tower"]) == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert metrics.token_f1("nothing", ["Eiffel Tower", "nothing"]) == 1.0
    assert metrics.token_f1("a", ["the"]) == 0.0  # both normalise to empty


def test_best_spans_respects_order_length_and_context() -> None:
    start = torch.tensor([[0.0, 5.0, 0.0, 0.0, 9.0]])
    end = torch.tensor([[0.0, 0.0, 4.0, 0.0, 0.0]])
    context = torch.tensor([[False, True, True, True, True]])
    s, e = metrics.best_spans(start, end, context)
    assert (int(s), int(e)) == (1, 2)  # start 4 scores higher but would end before it starts
    s, e = metrics.best_spans(start, end, context, max_answer_tokens=1)
    assert (int(s), int(e)) == (4, 4)
    s, e = metrics.best_spans(start, end, torch.tensor([[False, False, True, True, True]]))
    assert int(s) >= 2


def test_perplexity_is_exp_of_token_loss() -> None:
    assert metrics.perplexity(math.log(50.0)) == pytest.approx(50.0)
    assert math.isfinite(metrics.perplexity(1e6))
