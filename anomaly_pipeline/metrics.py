"""Scoring a run's predictions: the metrics at a threshold, the operating points, thresholds chosen on validation.

No torch here: plain arrays of labels (1 = faulty) and scores (the faulty probability).
"""

from __future__ import annotations

import logging

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

log = logging.getLogger("anomaly_pipeline.metrics")

# The operating points reported beside the metrics at the threshold: inspection users fix a miss rate or a
# false-alarm rate and read off the other.
OPERATING_POINT = 0.95


def predicted_labels(scores: np.ndarray, threshold: float) -> np.ndarray:
    """The decision rule, everywhere: 1 (faulty) where the faulty probability is >= the threshold, else 0."""
    return (np.asarray(scores) >= threshold).astype(int)


def candidate_thresholds(scores: np.ndarray) -> np.ndarray:
    """Every threshold that separates the scores differently: midpoints between neighbouring distinct scores,
    one below the lowest and one above the highest (an image is faulty when its score is >= the threshold)."""
    distinct = np.unique(scores)
    return np.concatenate([[distinct[0] / 2], (distinct[:-1] + distinct[1:]) / 2, [(distinct[-1] + 1) / 2]])


def sorted_class_scores(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The clean images' scores and the faulty images' scores, each sorted: the threshold rules count from these
    (memory and time grow with the number of thresholds, not with thresholds x images)."""
    return np.sort(scores[labels == 0]), np.sort(scores[labels == 1])


def recall_and_specificity_at(thresholds: np.ndarray, clean: np.ndarray,
                              faulty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Recall and specificity at each threshold (an image is faulty when its score is >= it), from each class's
    sorted scores (``sorted_class_scores``)."""
    recall = 1 - np.searchsorted(faulty, thresholds, side="left") / len(faulty)
    return recall, np.searchsorted(clean, thresholds, side="left") / len(clean)


def balanced_accuracy_gain_standard_error(thresholds: np.ndarray, reference: float, clean: np.ndarray,
                                          faulty: np.ndarray) -> np.ndarray:
    """For each threshold, the standard error of the difference between its balanced accuracy and the
    ``reference`` threshold's on the same images if neither were better. Only the images the two call
    differently (scores between them) count, each moving balanced accuracy by 1 / (2 x its class's image
    count), up or down alike: a paired, McNemar-style comparison. ``clean`` and ``faulty``: each class's sorted
    scores (``sorted_class_scores``)."""
    low, high = np.minimum(thresholds, reference), np.maximum(thresholds, reference)
    variance = np.zeros(len(thresholds))
    for members in (clean, faulty):
        between = np.searchsorted(members, high, side="left") - np.searchsorted(members, low, side="left")
        variance += between / (2 * len(members)) ** 2
    return np.sqrt(variance)


def choose_threshold(rule: float | str, labels: np.ndarray, scores: np.ndarray, target_recall: float) -> float:
    """The threshold for ``rule``: a number is used as it is; 'max_balanced_accuracy' is the threshold nearest
    0.5 (0.5 itself included) whose balanced accuracy on these (validation) scores is within one standard error
    of the best cut's (the one-standard-error rule, on the paired difference): a cut that beats 0.5 by less than
    the noise of the few images it calls differently is not taken; 'target_recall' is the highest threshold that
    still calls at least ``target_recall`` of the faulty images faulty."""
    if not isinstance(rule, str):
        return float(rule)
    if len(np.unique(labels)) < 2:
        log.warning("the validation images hold one class only: threshold rule %s cannot apply, using 0.5", rule)
        return 0.5
    candidates = candidate_thresholds(scores)
    clean, faulty = sorted_class_scores(labels, scores)
    if rule == "max_balanced_accuracy":
        candidates = np.append(candidates, 0.5)
        quality = np.mean(recall_and_specificity_at(candidates, clean, faulty), axis=0)

        def nearest_one_half(indices: np.ndarray) -> float:
            return float(candidates[indices[np.argmin(np.abs(candidates[indices] - 0.5))]])

        best = nearest_one_half(np.flatnonzero(quality >= quality.max() - 1e-12))  # of cuts tied for the best
        noise = balanced_accuracy_gain_standard_error(candidates, best, clean, faulty)
        return nearest_one_half(np.flatnonzero(quality.max() - quality <= noise + 1e-12))
    if rule == "target_recall":
        recall, _ = recall_and_specificity_at(candidates, clean, faulty)
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


def classification_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict:
    """Binary metrics (positive class = 1 = faulty) from true labels and positive-class probabilities: at the
    threshold, then the operating points that do not depend on it."""
    predicted = predicted_labels(scores, threshold)
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    both_classes = len(np.unique(labels)) == 2
    return {
        "accuracy": accuracy_score(labels, predicted),
        "balanced_accuracy": balanced_accuracy_score(labels, predicted) if both_classes else None,
        "precision": precision_score(labels, predicted, pos_label=1, zero_division=0),
        "recall": recall_score(labels, predicted, pos_label=1, zero_division=0),
        "f1": f1_score(labels, predicted, pos_label=1, zero_division=0),
        "specificity": recall_score(labels, predicted, pos_label=0, zero_division=0),
        "roc_auc": roc_auc_score(labels, scores) if both_classes else None,
        **operating_points(labels, scores),
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }
