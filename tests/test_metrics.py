"""Per-run metrics and their aggregation, checked against small cases worked out by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from anomaly_pipeline.metrics import (
    classification_metrics,
    predicted_labels,
    recall_and_specificity_at,
    sorted_class_scores,
)
from anomaly_pipeline.summary import summarize


def test_classification_metrics_hand_checked() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    scores = np.array([0.1, 0.6, 0.2, 0.9, 0.8, 0.4, 0.7, 0.3])
    # predicted 0 1 0 1 1 0 1 0 -> TN 2, FP 1, FN 2, TP 3
    metrics = classification_metrics(labels, scores)
    assert metrics["confusion_matrix"] == {"tn": 2, "fp": 1, "fn": 2, "tp": 3}
    assert metrics["accuracy"] == pytest.approx(5 / 8)
    assert metrics["precision"] == pytest.approx(3 / 4)
    assert metrics["recall"] == pytest.approx(3 / 5)
    assert metrics["specificity"] == pytest.approx(2 / 3)
    assert metrics["balanced_accuracy"] == pytest.approx((3 / 5 + 2 / 3) / 2)
    assert metrics["f1"] == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))
    # 13 of the 15 (faulty, clean) pairs are ranked correctly.
    assert metrics["roc_auc"] == pytest.approx(13 / 15)


def test_decision_rule_is_the_one_the_threshold_rules_count_with() -> None:
    """A score equal to the threshold is faulty, and the rules that choose a threshold on validation count
    recall and specificity exactly as the labels the evaluate stage and anomaly-predict write would give."""
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.2, 0.5, 0.5, 0.5, 0.7, 0.1])
    assert predicted_labels(scores, 0.5).tolist() == [0, 1, 1, 1, 1, 0]
    thresholds = np.array([0.0, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9])
    recall, specificity = recall_and_specificity_at(thresholds, *sorted_class_scores(labels, scores))
    for threshold, rule_recall, rule_specificity in zip(thresholds, recall, specificity):
        metrics = classification_metrics(labels, scores, threshold)
        assert (metrics["recall"], metrics["specificity"]) == pytest.approx((rule_recall, rule_specificity))


def test_model_that_never_says_faulty_scores_high_accuracy_but_zero_recall() -> None:
    labels = np.array([0] * 84 + [1] * 16)
    metrics = classification_metrics(labels, np.zeros(100))
    assert metrics["accuracy"] == pytest.approx(0.84)
    assert metrics["recall"] == 0 and metrics["precision"] == 0
    assert metrics["balanced_accuracy"] == pytest.approx(0.5)


def test_single_class_test_set_has_no_auc_or_balanced_accuracy() -> None:
    metrics = classification_metrics(np.array([1, 1, 1]), np.array([0.9, 0.2, 0.8]))
    assert metrics["roc_auc"] is None and metrics["balanced_accuracy"] is None
    assert metrics["recall"] == pytest.approx(2 / 3)


def test_summary_gives_mean_std_min_max_and_mean_confusion_matrix() -> None:
    table = pd.DataFrame([
        {"run": 0, "test_accuracy": 0.8, "train_seconds": 10.0, "arch": "resnet18", "weights": "random-init",
         "weights_source": "random init", "finetune": "head",
         "cm_tn": 4, "cm_fp": 1, "cm_fn": 1, "cm_tp": 4},
        {"run": 1, "test_accuracy": 0.6, "train_seconds": 20.0, "arch": "resnet18", "weights": "random-init",
         "weights_source": "random init", "finetune": "head",
         "cm_tn": 2, "cm_fp": 3, "cm_fn": 1, "cm_tp": 4},
    ])
    summary = summarize(table)
    assert summary["runs"] == 2 and summary["weights"] == "random-init" and summary["finetune"] == "head"
    assert summary["test_accuracy"] == pytest.approx({"mean": 0.7, "std": 0.141421, "min": 0.6, "max": 0.8})
    assert summary["train_seconds"]["mean"] == pytest.approx(15.0)
    assert summary["confusion_matrix_mean"] == {"tn": 3.0, "fp": 2.0, "fn": 1.0, "tp": 4.0}
    assert "run" not in summary and "cm_tn" not in summary
