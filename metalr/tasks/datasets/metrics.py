"""Metrics of the real tasks, each defined the way its dataset's community reports it.

Two kinds, because :meth:`Task.evaluate` averages *sums over a batch*:

* decomposable metrics (accuracy, top-5 accuracy, SQuAD exact match and token F1: means over examples)
  are returned as sums by the tasks' ``metrics_fn``;
* metrics that are not means over examples (precision, recall, F1, AUC, perplexity) are computed from a
  whole split at once by the functions here, which the real tasks expose as ``task.extra["split_metrics"]``
  (see :func:`metalr.tasks.real.evaluate_split`).
"""

from __future__ import annotations

import collections
import math
import re
import string

import torch
from torch import Tensor


def confusion_counts(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``num_classes x num_classes`` matrix, rows = true class, columns = predicted class."""
    index = labels.long() * num_classes + predictions.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def precision_recall_f1(predictions: Tensor, labels: Tensor, num_classes: int) -> dict[str, float]:
    """Binary (positive class 1) precision/recall/F1 for two classes, plus macro averages for any count.

    A class that is never predicted (or never present) has precision (recall) 0, as scikit-learn's
    ``zero_division=0``.
    """
    counts = confusion_counts(predictions, labels, num_classes).double()
    true_pos = counts.diag()
    predicted = counts.sum(0)
    actual = counts.sum(1)
    precision = torch.where(predicted > 0, true_pos / predicted.clamp_min(1), torch.zeros_like(true_pos))
    recall = torch.where(actual > 0, true_pos / actual.clamp_min(1), torch.zeros_like(true_pos))
    denominator = precision + recall
    f1 = torch.where(
        denominator > 0, 2 * precision * recall / denominator.clamp_min(1e-12), torch.zeros_like(true_pos)
    )
    out = {
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
    }
    if num_classes == 2:
        out.update({"precision": float(precision[1]), "recall": float(recall[1]), "f1": float(f1[1])})
    return out


def binary_auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve: the probability that a random positive outscores a random negative,
    ties counting one half (Mann-Whitney U). NaN when one class is absent."""
    scores = scores.double().flatten()
    labels = labels.flatten().bool()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return math.nan
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # Average the ranks of tied scores.
    unique, inverse, counts = torch.unique(sorted_scores, return_inverse=True, return_counts=True)
    if len(unique) < len(scores):
        rank_sums = torch.zeros(len(unique), dtype=torch.float64).index_add_(
            0, inverse, torch.arange(1, len(scores) + 1, dtype=torch.float64)
        )
        ranks[order] = (rank_sums / counts)[inverse]
    rank_sum = float(ranks[labels].sum())
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def classification_summary(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Precision/recall/F1 (binary and macro) and, for two classes, AUC of the positive-class score."""
    num_classes = logits.shape[-1]
    out = precision_recall_f1(logits.argmax(-1), labels, num_classes)
    if num_classes == 2:
        out["auc"] = binary_auc(logits[:, 1] - logits[:, 0], labels)
    return out


def perplexity(mean_token_nll: float) -> float:
    """``exp`` of the mean per-token negative log-likelihood (nats), capped to stay finite in reports."""
    return math.exp(min(mean_token_nll, 50.0))


# ----------------------------------------------------------------------------------------------------------
# SQuAD v1.1, as its official evaluate-v1.1.py defines them.

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold_answers: list[str]) -> float:
    return float(max(normalize_answer(prediction) == normalize_answer(g) for g in gold_answers))


def _token_f1(prediction: str, gold: str) -> float:
    predicted_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = collections.Counter(predicted_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, gold_answers: list[str]) -> float:
    """Bag-of-tokens F1 against the best-matching gold answer."""
    return max(_token_f1(prediction, g) for g in gold_answers)


def best_spans(
    start_logits: Tensor, end_logits: Tensor, context_mask: Tensor, max_answer_tokens: int = 30
) -> tuple[Tensor, Tensor]:
    """Highest-scoring ``(start, end)`` per row with ``start <= end < start + max_answer_tokens``, both in
    the context (the decoding of the BERT paper and of Hugging Face's QA examples)."""
    length = start_logits.shape[-1]
    very_negative = torch.finfo(start_logits.dtype).min / 4
    start_logits = start_logits.masked_fill(~context_mask, very_negative)
    end_logits = end_logits.masked_fill(~context_mask, very_negative)
    scores = start_logits.unsqueeze(-1) + end_logits.unsqueeze(-2)  # [batch, start, end]
    positions = torch.arange(length, device=start_logits.device)
    offset = positions.unsqueeze(0) - positions.unsqueeze(1)  # end - start
    allowed = (offset >= 0) & (offset < max_answer_tokens)
    scores = scores.masked_fill(~allowed, very_negative)
    flat = scores.flatten(1).argmax(-1)
    return flat // length, flat % length
