"""Thresholds chosen on validation scores, and the operating-point metrics, on scores with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from anomaly_pipeline.metrics import (
    balanced_accuracy_gain_standard_error,
    candidate_thresholds,
    choose_threshold,
    operating_points,
    recall_and_specificity_at,
    sorted_class_scores,
)

# 6 clean and 4 faulty validation images; a model that ranks them imperfectly and scores defects low (a model
# trained on rare defects): at 0.5 only 1 of the 4 defects is caught.
LABELS = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
SCORES = np.array([0.01, 0.02, 0.05, 0.10, 0.20, 0.35, 0.15, 0.30, 0.40, 0.60])


def test_a_number_is_used_as_it_is() -> None:
    assert choose_threshold(0.5, LABELS, SCORES, 0.95) == 0.5


def test_candidates_separate_every_pair_of_neighbouring_scores() -> None:
    candidates = candidate_thresholds(np.array([0.2, 0.6, 0.2, 0.9]))
    assert candidates == pytest.approx([0.1, 0.4, 0.75, 0.95])


def test_max_balanced_accuracy_picks_the_best_cut_when_the_validation_set_can_tell() -> None:
    # The same scores 40 times over: cutting between 0.10 and 0.15 calls all defects and 4 of 6 clean images
    # clean, balanced accuracy (4/4 + 4/6) / 2 = 0.83, the best of all cuts (0.25 gives 0.79, 0.375 gives
    # 0.75, 0.5 gives 0.625); on 400 images each of those gaps is several standard errors.
    labels, scores = np.tile(LABELS, 40), np.tile(SCORES, 40)
    threshold = choose_threshold("max_balanced_accuracy", labels, scores, 0.95)
    assert threshold == pytest.approx(0.125)
    called = scores >= threshold
    assert called[labels == 1].mean() == 1 and (~called[labels == 0]).mean() == pytest.approx(4 / 6)


def test_the_gain_is_measured_on_the_images_two_cuts_call_differently() -> None:
    # 0.5 against the best cut (0.125) on the 10 images: 3 defects only the best catches (each 1/8 of balanced
    # accuracy), 2 clean images only 0.5 gets right (each 1/12): gain 3/8 - 2/12 = 0.21, standard error
    # sqrt(3/8^2 + 2/12^2) = 0.25. Images both cuts call alike do not count.
    noise = balanced_accuracy_gain_standard_error(np.array([0.125, 0.5]), 0.125,
                                                  *sorted_class_scores(LABELS, SCORES))
    assert noise == pytest.approx([0, np.sqrt(3 / 64 + 2 / 144)])


def test_balanced_accuracy_is_counted_from_sorted_scores_as_sklearn_counts_it() -> None:
    thresholds = np.append(candidate_thresholds(SCORES), 0.5)
    recall, specificity = recall_and_specificity_at(thresholds, *sorted_class_scores(LABELS, SCORES))
    expected = [balanced_accuracy_score(LABELS, (SCORES >= threshold).astype(int)) for threshold in thresholds]
    assert (recall + specificity) / 2 == pytest.approx(expected)


@pytest.mark.parametrize(("copies", "expected"), [(1, 0.5), (2, 0.375), (10, 0.25), (40, 0.125)])
def test_max_balanced_accuracy_does_not_chase_the_noise_of_a_small_validation_set(copies: int, expected: float) -> None:
    # On the 10 images the best cut's gain over 0.5 (0.21) is within its standard error (0.25): 0.5 stays.
    # With more copies of the same images the standard error shrinks, and the threshold walks to the best cut.
    threshold = choose_threshold("max_balanced_accuracy", np.tile(LABELS, copies), np.tile(SCORES, copies), 0.95)
    assert threshold == pytest.approx(expected)


def test_one_half_is_kept_when_it_is_as_good_as_the_best() -> None:
    labels, scores = np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.7, 0.9])
    # Every threshold between 0.2 and 0.7 separates the classes perfectly: 0.5 itself, not the midpoint 0.45.
    assert choose_threshold("max_balanced_accuracy", labels, scores, 0.95) == 0.5
    # A third of the clean images at 0.6: 0.5 calls them faulty (0.83 against 1.0 at 0.65). On 3 + 2 images
    # that is one image, as large as its standard error, and 0.5 stays; on 30 + 20 the cut moves above them.
    labels, scores = np.array([0, 0, 0, 1, 1]), np.array([0.1, 0.2, 0.6, 0.7, 0.9])
    assert choose_threshold("max_balanced_accuracy", labels, scores, 0.95) == 0.5
    labels, scores = np.tile(labels, 10), np.tile(scores, 10)
    assert choose_threshold("max_balanced_accuracy", labels, scores, 0.95) == pytest.approx(0.65)


@pytest.mark.parametrize(("target", "expected"), [(0.95, 0.125), (0.75, 0.25), (0.5, 0.375), (0.25, 0.5)])
def test_target_recall_is_the_highest_threshold_that_catches_enough_defects(target: float, expected: float) -> None:
    threshold = choose_threshold("target_recall", LABELS, SCORES, target)
    assert threshold == pytest.approx(expected)
    assert (SCORES[LABELS == 1] >= threshold).mean() >= target


def test_one_class_in_validation_falls_back_to_one_half() -> None:
    assert choose_threshold("max_balanced_accuracy", np.zeros(4, int), SCORES[:4], 0.95) == 0.5


def test_operating_points_read_off_the_roc_and_precision_recall_curves() -> None:
    points = operating_points(LABELS, SCORES)
    # Recall >= 95 % means all 4 defects: the threshold must be at most 0.15, calling 4 of 6 clean ones clean.
    assert points["specificity_at_recall_95"] == pytest.approx(4 / 6)
    # Specificity >= 95 % means no clean image called faulty: above 0.35 only 2 of the 4 defects are caught.
    assert points["recall_at_specificity_95"] == pytest.approx(2 / 4)
    # Average precision: the precision where each defect is caught, in score order (1/1, 2/2, 3/4, 4/6), averaged.
    assert points["average_precision"] == pytest.approx((1 + 1 + 3 / 4 + 4 / 6) / 4)
    assert operating_points(np.ones(3, int), SCORES[:3]) == dict.fromkeys(points)
