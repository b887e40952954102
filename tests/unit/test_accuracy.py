"""Precision, recall and mAP@0.5 by greedy matching: the figures the model card and the fleet test report."""

from __future__ import annotations

import pytest

from detfleet.accuracy import score
from detfleet.synth import Box

CLASSES = ("part", "scratch")
PART, SCRATCH = 0, 1


def box(label: int, x1: float, y1: float, x2: float, y2: float, score: float = 1.0) -> Box:
    return Box(label, x1, y1, x2, y2, score)


TRUTH = [
    (box(PART, 10, 10, 110, 90), box(SCRATCH, 20, 20, 50, 50)),
    (box(PART, 200, 100, 300, 180),),
]


def test_perfect_predictions_score_one_everywhere() -> None:
    predicted = [tuple(box(b.label, b.x1, b.y1, b.x2, b.y2, 0.9) for b in image) for image in TRUTH]

    scores = score(predicted, TRUTH, CLASSES)

    assert (scores.precision, scores.recall, scores.map50) == (1.0, 1.0, 1.0)
    assert (scores.true_positives, scores.false_positives, scores.false_negatives) == (3, 0, 0)
    assert scores.per_class == {"part": (1.0, 1.0, 1.0), "scratch": (1.0, 1.0, 1.0)}


def test_a_box_shifted_below_iou_half_is_a_false_positive_and_a_false_negative() -> None:
    truth = [(box(PART, 0, 0, 100, 100),)]
    shifted = [(box(PART, 40, 0, 140, 100, 0.9),)]  # IoU 60 / 140 = 0.43
    nudged = [(box(PART, 30, 0, 130, 100, 0.9),)]  # IoU 70 / 130 = 0.54

    missed = score(shifted, truth, CLASSES)
    found = score(nudged, truth, CLASSES)

    assert (missed.true_positives, missed.false_positives, missed.false_negatives) == (0, 1, 1)
    assert (missed.precision, missed.recall) == (0.0, 0.0)
    assert (found.true_positives, found.false_positives, found.false_negatives) == (1, 0, 0)


def test_a_stricter_iou_turns_a_loose_match_into_a_miss() -> None:
    truth = [(box(PART, 0, 0, 100, 100),)]
    loose = [(box(PART, 30, 0, 130, 100, 0.9),)]  # IoU 0.54

    assert score(loose, truth, CLASSES, iou=0.75).true_positives == 0


def test_the_right_box_with_the_wrong_class_is_a_false_positive_and_a_false_negative() -> None:
    truth = [(box(PART, 0, 0, 100, 100),)]
    predicted = [(box(SCRATCH, 0, 0, 100, 100, 0.9),)]

    scores = score(predicted, truth, CLASSES)

    assert (scores.true_positives, scores.false_positives, scores.false_negatives) == (0, 1, 1)
    assert scores.per_class["part"] == (0.0, 0.0, 0.0)
    assert scores.per_class["scratch"] == (0.0, 0.0, 0.0)


def test_a_duplicate_prediction_is_one_true_positive_and_one_false_positive() -> None:
    truth = [(box(PART, 0, 0, 100, 100),)]
    predicted = [(box(PART, 0, 0, 100, 100, 0.6), box(PART, 2, 2, 100, 100, 0.9))]

    scores = score(predicted, truth, CLASSES)

    assert (scores.true_positives, scores.false_positives, scores.false_negatives) == (1, 1, 0)
    assert scores.precision == 0.5
    assert scores.recall == 1.0
    assert scores.map50 == 1.0  # the better-scored copy matched first: recall 1 reached at precision 1


def test_average_precision_rewards_ranking_the_true_detections_above_the_false_ones() -> None:
    truth = [(box(PART, 0, 0, 100, 100),), (box(PART, 0, 0, 100, 100),)]
    second_image = (box(PART, 0, 0, 100, 100, 0.5),)
    ranked_well = [(box(PART, 0, 0, 100, 100, 0.9), box(PART, 300, 300, 400, 400, 0.1)), second_image]
    ranked_badly = [(box(PART, 0, 0, 100, 100, 0.1), box(PART, 300, 300, 400, 400, 0.9)), second_image]

    well = score(ranked_well, truth, CLASSES)
    badly = score(ranked_badly, truth, CLASSES)

    assert (well.precision, well.recall) == (badly.precision, badly.recall) == (2 / 3, 1.0)
    assert well.map50 == 1.0
    # Badly ranked, the false positive comes first: precision 1/2 at recall 1/2, 2/3 at recall 1.
    assert badly.map50 == pytest.approx(0.5 * (2 / 3) + 0.5 * (2 / 3))


def test_matching_is_per_image_and_per_class() -> None:
    truth = [(box(PART, 0, 0, 100, 100),), ()]
    predicted = [(), (box(PART, 0, 0, 100, 100, 0.9),)]  # the right box, in the wrong image

    scores = score(predicted, truth, CLASSES)

    assert (scores.true_positives, scores.false_positives, scores.false_negatives) == (0, 1, 1)


def test_no_predictions_on_empty_frames_is_no_error() -> None:
    scores = score([(), ()], [(), ()], CLASSES)

    assert (scores.precision, scores.recall, scores.map50) == (0.0, 0.0, 0.0)
    assert (scores.true_positives, scores.false_positives, scores.false_negatives) == (0, 0, 0)


def test_a_class_absent_from_truth_and_predictions_is_left_out_of_the_mean() -> None:
    truth = [(box(PART, 0, 0, 100, 100),)]
    predicted = [(box(PART, 0, 0, 100, 100, 0.8),)]

    assert score(predicted, truth, CLASSES).map50 == 1.0


def test_predictions_and_truth_must_cover_the_same_images() -> None:
    with pytest.raises(ValueError, match="2 images of predictions against 1"):
        score([(), ()], [()], CLASSES)
