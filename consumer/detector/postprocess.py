"""Raw outputs to detections: layout detection, thresholds, class-aware NMS, boxes back to source pixels."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from consumer.detector.base import DecodedFrame, Detection, ModelInfo
from consumer.detector.preprocess import Letterbox

MAX_NMS_CANDIDATES = 30_000  # as ultralytics: bounds NMS time on a degenerate output full of weak boxes
END_TO_END_COLUMNS = 6  # x1, y1, x2, y2, score, class


class OutputLayout(enum.Enum):
    YOLO_HEAD = "[B, 4 + classes, N]: cx, cy, w, h, one score per class; needs NMS"
    END_TO_END = "[B, K, 6]: x1, y1, x2, y2, score, class; already suppressed"


@dataclass(frozen=True)
class Thresholds:
    confidence: float = 0.25
    iou: float = 0.45
    max_detections: int = 300


@dataclass(frozen=True)
class ImageBoxes:
    """One image's kept boxes in canvas pixels, best first."""

    boxes: np.ndarray  # [K, 4] x1, y1, x2, y2
    scores: np.ndarray  # [K]
    class_ids: np.ndarray  # [K]


def detect_layout(shape: tuple[int, ...], num_classes: int | None = None) -> OutputLayout:
    """Which layout a [B, ., .] output has; the class count, where known, settles a [B, 6, 6]-like tie."""
    if len(shape) != 3:
        raise ValueError(f"expected a 3-dimensional detection output, got shape {shape}")
    rows, columns = shape[1], shape[2]
    if num_classes is not None and rows == 4 + num_classes and columns != END_TO_END_COLUMNS:
        return OutputLayout.YOLO_HEAD
    if columns == END_TO_END_COLUMNS and rows != END_TO_END_COLUMNS:
        return OutputLayout.END_TO_END
    if rows > 4:
        return OutputLayout.YOLO_HEAD
    raise ValueError(f"output shape {shape} is neither [B, 4 + classes, N] nor [B, K, 6]")


def decode_head(prediction: np.ndarray, thresholds: Thresholds) -> ImageBoxes:
    """One image of a [4 + classes, N] head: best class per anchor, threshold, class-aware NMS."""
    anchors = prediction.T  # [N, 4 + classes]
    class_scores = anchors[:, 4:]
    class_ids = class_scores.argmax(axis=1)
    scores = np.take_along_axis(class_scores, class_ids[:, None], axis=1)[:, 0]
    keep = _strongest(scores, thresholds.confidence, MAX_NMS_CANDIDATES)
    centre_boxes, scores, class_ids = anchors[keep, :4], scores[keep], class_ids[keep]
    top_left_boxes = np.concatenate(
        [centre_boxes[:, :2] - centre_boxes[:, 2:] / 2, centre_boxes[:, 2:]], axis=1
    )
    # No top_k: OpenCV applies it to the candidates before suppression, which would lose boxes after it.
    survivors = cv2.dnn.NMSBoxesBatched(
        top_left_boxes.astype(np.float32),  # type: ignore[arg-type]  # the stubs say sequences; arrays work
        scores.astype(np.float32),
        class_ids.astype(np.int32),
        thresholds.confidence,
        thresholds.iou,
    )
    kept = np.asarray(survivors, dtype=np.int64).reshape(-1)[: thresholds.max_detections]
    corner_boxes = top_left_boxes[kept].copy()
    corner_boxes[:, 2:] += corner_boxes[:, :2]
    return ImageBoxes(corner_boxes, scores[kept], class_ids[kept])


def decode_end_to_end(prediction: np.ndarray, thresholds: Thresholds) -> ImageBoxes:
    """One image of a [K, 6] end-to-end output: threshold and keep the best max_detections."""
    scores = prediction[:, 4]
    keep = _strongest(scores, thresholds.confidence, thresholds.max_detections)
    return ImageBoxes(prediction[keep, :4], scores[keep], prediction[keep, 5].round().astype(np.int64))


def _strongest(scores: np.ndarray, minimum: float, limit: int) -> np.ndarray:
    """Indices of the scores >= minimum, best first, at most limit of them."""
    passing = np.flatnonzero(scores >= minimum)
    order = np.argsort(-scores[passing], kind="stable")[:limit]
    return passing[order]


def to_detections(
    found: ImageBoxes, placement: Letterbox, frame: DecodedFrame, info: ModelInfo
) -> list[Detection]:
    """Canvas boxes mapped back to the frame's pixels, then to the source frame (through its reduction);
    boxes that lie wholly in the padding, or past the source's edge, are dropped."""
    boxes = frame.to_source(placement.to_source(found.boxes.astype(np.float64)))
    visible = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return [
        Detection(
            class_id=int(class_id),
            label=info.label(int(class_id)),
            score=float(score),
            box=(float(box[0]), float(box[1]), float(box[2]), float(box[3])),
        )
        for box, score, class_id in zip(
            boxes[visible], found.scores[visible], found.class_ids[visible], strict=True
        )
    ]


def decode_batch(
    output: np.ndarray,
    placements: list[Letterbox],
    frames: Sequence[DecodedFrame],
    info: ModelInfo,
    thresholds: Thresholds,
) -> list[list[Detection]]:
    """Detections per frame, in source pixels, from one batch output of either layout; placements[i] is
    how frames[i].pixels sit on the canvas."""
    layout = detect_layout(output.shape, len(info.class_names) or None)
    decode = decode_head if layout is OutputLayout.YOLO_HEAD else decode_end_to_end
    return [
        to_detections(decode(prediction, thresholds), placement, frame, info)
        for prediction, placement, frame in zip(output, placements, frames, strict=True)
    ]
