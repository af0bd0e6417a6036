"""Decision thresholds chosen on validation scores, and operating-point metrics of a set of scores.

No torch here: evaluate and the tests use it on plain arrays (labels 1 = faulty, scores = faulty probability).
"""

from __future__ import annotations

import logging

import numpy as np
from sklearn.metrics import average_precision_score, balanced_accuracy_score, recall_score, roc_curve

log = logging.getLogger("anomaly_pipeline.thresholds")

# The operating points reported beside the metrics at the threshold: inspection users fix a miss rate or a
# false-alarm rate and read off the other.
OPERATING_POINT = 0.95


def candidate_thresholds(scores: np.ndarray) -> np.ndarray:
    """Every threshold that separates the scores differently: midpoints between neighbouring distinct scores,
    one below the lowest and one above the highest (an image is faulty when its score is >= the threshold)."""
    distinct = np.unique(scores)
    return np.concatenate([[distinct[0] / 2], (distinct[:-1] + distinct[1:]) / 2, [(distinct[-1] + 1) / 2]])


def choose_threshold(rule: float | str, labels: np.ndarray, scores: np.ndarray, target_recall: float) -> float:
    """The threshold for ``rule``: a number is used as it is; 'max_balanced_accuracy' maximises the balanced
    accuracy on these (validation) scores, ties broken towards 0.5; 'target_recall' is the highest threshold
    that still calls at least ``target_recall`` of the faulty images faulty."""
    if not isinstance(rule, str):
        return float(rule)
    if len(np.unique(labels)) < 2:
        log.warning("the validation images hold one class only: threshold rule %s cannot apply, using 0.5", rule)
        return 0.5
    candidates = candidate_thresholds(scores)
    predicted = (scores[None, :] >= candidates[:, None]).astype(int)
    if rule == "max_balanced_accuracy":
        quality = np.array([balanced_accuracy_score(labels, row) for row in predicted])
        best = np.flatnonzero(np.isclose(quality, quality.max()))
        return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])
    if rule == "target_recall":
        recall = np.array([recall_score(labels, row, zero_division=0) for row in predicted])
        return float(candidates[np.flatnonzero(recall >= target_recall - 1e-12).max()])
    raise ValueError(f"unknown threshold rule {rule!r}")


def operating_points(labels: np.ndarray, scores: np.ndarray, level: float = OPERATING_POINT) -> dict[str, float | None]:
    """Specificity where recall reaches ``level``, recall where specificity reaches ``level`` (both the best any
    threshold gives) and the average precision (area under the precision-recall curve); None on one class."""
    percent = round(level * 100)
    names = (f"specificity_at_recall_{percent}", f"recall_at_specificity_{percent}", "average_precision")
    if len(np.unique(labels)) < 2:
        return dict.fromkeys(names)
    fpr, tpr, _ = roc_curve(labels, scores)
    return {
        names[0]: float((1 - fpr[tpr >= level]).max()),
        names[1]: float(tpr[fpr <= 1 - level].max()),
        names[2]: float(average_precision_score(labels, scores)),
    }
