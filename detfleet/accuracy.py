"""Detections against ground truth: precision, recall and mAP@0.5 with greedy matching by score.

A prediction is a true positive when it overlaps a not yet matched ground-truth box of the same class with an
IoU of at least ``iou``; predictions are taken best score first, per image. Precision and recall count every
prediction given (the caller has already applied its confidence threshold). AP per class is the all-point
interpolated area under the precision-recall curve (VOC 2010+ / COCO style), and mAP@0.5 its mean over the
classes that occur (in the ground truth or the predictions): as in COCO, a class absent from both is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class BoxLike(Protocol):
    """detfleet.synth.Box, or anything with its fields."""

    @property
    def label(self) -> int: ...
    @property
    def x1(self) -> float: ...
    @property
    def y1(self) -> float: ...
    @property
    def x2(self) -> float: ...
    @property
    def y2(self) -> float: ...
    @property
    def score(self) -> float: ...


@dataclass(frozen=True)
class Scores:
    precision: float
    recall: float
    map50: float
    true_positives: int
    false_positives: int
    false_negatives: int
    per_class: dict[str, tuple[float, float, float]]  # name -> (precision, recall, ap50)


@dataclass(frozen=True)
class _Outcome:
    """One prediction after matching: its class, score and whether it matched a ground-truth box."""

    label: int
    score: float
    matched: bool


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a [N, 4] against every box in b [M, 4] (x1, y1, x2, y2): [N, M]."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    overlap = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - overlap
    result: np.ndarray = np.divide(overlap, union, out=np.zeros_like(overlap), where=union > 0)
    return result


def _corners(boxes: Sequence[BoxLike]) -> np.ndarray:
    return np.array([[b.x1, b.y1, b.x2, b.y2] for b in boxes], np.float64).reshape(-1, 4)


def _match_image(predicted: Sequence[BoxLike], truth: Sequence[BoxLike], iou: float) -> list[_Outcome]:
    """Greedy: best score first, each takes the best-overlapping free ground truth of its class."""
    order = sorted(range(len(predicted)), key=lambda i: -predicted[i].score)
    overlaps = iou_matrix(_corners(predicted), _corners(truth))
    truth_labels = np.array([t.label for t in truth], np.int64)
    free = np.ones(len(truth), bool)
    outcomes = []
    for index in order:
        box = predicted[index]
        candidates = np.where(free & (truth_labels == box.label), overlaps[index], -1.0)
        best = int(np.argmax(candidates)) if len(truth) else -1
        matched = best >= 0 and candidates[best] >= iou
        if matched:
            free[best] = False
        outcomes.append(_Outcome(box.label, box.score, matched))
    return outcomes


def average_precision(scores: np.ndarray, matched: np.ndarray, positives: int) -> float:
    """All-point interpolated AP of one class's predictions (pooled over images) against its positives."""
    if positives == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    hits = matched[order].astype(np.float64)
    true_positives = np.cumsum(hits)
    precision = true_positives / np.arange(1, len(hits) + 1)
    recall = true_positives / positives
    # The precision envelope: at each recall, the best precision reached at that recall or beyond.
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[1.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def score(
    predicted: Sequence[Sequence[BoxLike]],
    truth: Sequence[Sequence[BoxLike]],
    class_names: Sequence[str],
    iou: float = 0.5,
) -> Scores:
    """Precision, recall and mAP@iou of predictions per image against ground truth per image."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} images of predictions against {len(truth)} of ground truth")
    outcomes = [o for p, t in zip(predicted, truth, strict=True) for o in _match_image(p, t, iou)]
    truth_labels = np.array([b.label for boxes in truth for b in boxes], np.int64)
    positives = np.bincount(truth_labels, minlength=len(class_names))
    per_class: dict[str, tuple[float, float, float]] = {}
    occurring: list[float] = []
    for label, name in enumerate(class_names):
        mine = [o for o in outcomes if o.label == label]
        hits = np.array([o.matched for o in mine], bool)
        found = int(hits.sum())
        ap = average_precision(np.array([o.score for o in mine], np.float64), hits, int(positives[label]))
        per_class[name] = (_ratio(found, len(mine)), _ratio(found, int(positives[label])), ap)
        if mine or positives[label]:
            occurring.append(ap)
    true_positives = sum(o.matched for o in outcomes)
    total_truth = sum(len(t) for t in truth)
    return Scores(
        precision=_ratio(true_positives, len(outcomes)),
        recall=_ratio(true_positives, total_truth),
        map50=float(np.mean(occurring)) if occurring else 0.0,
        true_positives=true_positives,
        false_positives=len(outcomes) - true_positives,
        false_negatives=total_truth - true_positives,
        per_class=per_class,
    )
