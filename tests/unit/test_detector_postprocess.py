"""Output decoding on known tensors: layout detection, thresholds, class-aware NMS, mapping back."""

from __future__ import annotations

import numpy as np
import pytest

from consumer.detector.base import DecodedFrame, ModelInfo
from consumer.detector.postprocess import (
    OutputLayout,
    Thresholds,
    decode_batch,
    decode_end_to_end,
    decode_head,
    detect_layout,
)
from consumer.detector.preprocess import Letterbox
from tests.support.onnx_graphs import CanvasBox, end_to_end_tensor, head_tensor

INFO = ModelInfo("m.onnx", "0" * 64, "CPUExecutionProvider", ("part", "scratch"), (640, 640), None)


@pytest.mark.parametrize(
    ("shape", "num_classes", "layout"),
    [
        ((1, 84, 8400), 80, OutputLayout.YOLO_HEAD),
        ((1, 84, 8400), None, OutputLayout.YOLO_HEAD),
        ((4, 300, 6), 80, OutputLayout.END_TO_END),
        ((4, 300, 6), None, OutputLayout.END_TO_END),
        ((1, 6, 6), 2, OutputLayout.YOLO_HEAD),  # two classes, six anchors: the class count decides
        ((1, 6, 6), None, OutputLayout.YOLO_HEAD),
        ((2, 5, 6), 2, OutputLayout.END_TO_END),
    ],
)
def test_the_layout_is_read_from_the_shape(
    shape: tuple[int, ...], num_classes: int | None, layout: OutputLayout
) -> None:
    assert detect_layout(shape, num_classes) is layout


@pytest.mark.parametrize("shape", [(1, 84), (1, 3, 100), (1, 2, 3, 4)])
def test_other_shapes_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="output"):
        detect_layout(shape)


def boxes_of(found: object) -> list[tuple[float, ...]]:
    return [tuple(row) for row in np.asarray(found).round(3).tolist()]


def test_overlapping_boxes_of_one_class_are_suppressed_and_of_two_classes_kept() -> None:
    head = head_tensor(
        [
            CanvasBox(100, 100, 200, 200, 0.9, 0),
            CanvasBox(105, 102, 205, 198, 0.8, 0),  # IoU ~0.87 with the first, same class: suppressed
            CanvasBox(104, 100, 204, 200, 0.7, 1),  # same place, other class: kept
            CanvasBox(300, 300, 350, 350, 0.6, 0),  # same class, no overlap: kept
        ],
        num_classes=2,
        anchors=10,
    )
    found = decode_head(head, Thresholds())
    assert boxes_of(found.boxes) == [(100, 100, 200, 200), (104, 100, 204, 200), (300, 300, 350, 350)]
    assert found.class_ids.tolist() == [0, 1, 0]
    assert found.scores.tolist() == pytest.approx([0.9, 0.7, 0.6])


def test_boxes_overlapping_less_than_the_iou_threshold_survive() -> None:
    # IoU of these two is 50 * 100 / (2 * 100 * 100 - 50 * 100) = 1/3
    head = head_tensor([CanvasBox(0, 0, 100, 100, 0.9, 0), CanvasBox(50, 0, 150, 100, 0.8, 0)], 1, 4)
    assert len(decode_head(head, Thresholds(iou=0.45)).scores) == 2
    assert len(decode_head(head, Thresholds(iou=0.3)).scores) == 1


def test_the_best_class_of_an_anchor_is_taken() -> None:
    head = head_tensor([CanvasBox(10, 10, 20, 20, 0.5, 0)], 3, 2)
    head[6, 0] = 0.8  # class 2 scores higher on the same anchor
    found = decode_head(head, Thresholds())
    assert found.class_ids.tolist() == [2]
    assert found.scores.tolist() == pytest.approx([0.8])


def spread_boxes(count: int) -> list[CanvasBox]:
    """Non-overlapping boxes with falling scores 0.9, 0.85, ..."""
    return [CanvasBox(20 * i, 0, 20 * i + 10, 10, 0.9 - 0.05 * i, i % 2) for i in range(count)]


def test_the_confidence_threshold_is_respected_in_both_layouts() -> None:
    boxes = spread_boxes(10)  # scores 0.9 down to 0.45
    for found in (
        decode_head(head_tensor(boxes, 2, 16), Thresholds(confidence=0.68)),
        decode_end_to_end(end_to_end_tensor(boxes, 16), Thresholds(confidence=0.68)),
    ):
        assert found.scores.tolist() == pytest.approx([0.9, 0.85, 0.8, 0.75, 0.7])


def test_max_detections_keeps_the_best_in_both_layouts() -> None:
    boxes = spread_boxes(10)[::-1]  # worst first, so keeping the first rows would be wrong
    for found in (
        decode_head(head_tensor(boxes, 2, 16), Thresholds(max_detections=3)),
        decode_end_to_end(end_to_end_tensor(boxes, 16), Thresholds(max_detections=3)),
    ):
        assert found.scores.tolist() == pytest.approx([0.9, 0.85, 0.8])


def test_end_to_end_rows_are_not_suppressed_again() -> None:
    rows = end_to_end_tensor([CanvasBox(0, 0, 100, 100, 0.9, 1), CanvasBox(1, 1, 100, 100, 0.8, 1)], 5)
    found = decode_end_to_end(rows, Thresholds())
    assert boxes_of(found.boxes) == [(0, 0, 100, 100), (1, 1, 100, 100)]
    assert found.class_ids.tolist() == [1, 1]


def frame(source: tuple[int, int], reduction: int = 1) -> DecodedFrame:
    """A black frame of source size decoded at 1/reduction (libjpeg's rounded-up size)."""
    width, height = source
    pixels = np.zeros((-(-height // reduction), -(-width // reduction), 3), np.uint8)
    return DecodedFrame(pixels, source, reduction)


def test_an_empty_output_gives_no_detections() -> None:
    placements = [Letterbox.fit((64, 64), (640, 640))] * 2
    frames = [frame((64, 64))] * 2
    assert decode_batch(np.zeros((2, 6, 8), np.float32), placements, frames, INFO, Thresholds()) == [[], []]


@pytest.mark.parametrize("source", [(640, 640), (1280, 720), (720, 1280), (333, 777), (64, 48)])
def test_canvas_boxes_map_back_to_the_source_box(source: tuple[int, int]) -> None:
    width, height = source
    placement = Letterbox.fit(source, (640, 640))
    wanted = np.array([[0.1 * width, 0.25 * height, 0.6 * width, 0.95 * height]])
    output = head_tensor([CanvasBox.at(placement.to_canvas(wanted)[0], 0.9, 1)], 2, 4)[None]
    [[detection]] = decode_batch(output, [placement], [frame(source)], INFO, Thresholds())
    assert detection.box == pytest.approx(tuple(wanted[0]), abs=0.5)
    assert (detection.class_id, detection.label) == (1, "scratch")
    assert detection.to_json() == {
        "class_id": 1,
        "label": "scratch",
        "score": detection.score,
        "box": list(detection.box),
    }


def test_boxes_wholly_in_the_padding_are_dropped_and_others_clipped() -> None:
    placement = Letterbox.fit((1280, 720), (640, 640))  # padding rows 0..140 and 500..640
    output = head_tensor([CanvasBox(10, 10, 100, 100, 0.9, 0), CanvasBox(-5, 120, 100, 200, 0.8, 0)], 2, 4)[
        None
    ]
    [detections] = decode_batch(output, [placement], [frame((1280, 720))], INFO, Thresholds())
    assert [d.box for d in detections] == [pytest.approx((0.0, 0.0, 200.0, 120.0))]


@pytest.mark.parametrize("reduction", [2, 4, 8])
def test_boxes_of_a_reduced_frame_scale_by_its_reduction_and_clip_to_the_source(reduction: int) -> None:
    reduced = frame((333, 250), reduction)  # libjpeg rounds up: 167x125, 84x63, 42x32 pixels
    width, height = reduced.pixels.shape[1], reduced.pixels.shape[0]
    placement = Letterbox.fit((width, height), (width, width))  # the canvas fits the pixels: no resize
    inside = np.array([[2.0, 3.0, 20.0, 30.0]])  # in reduced pixels
    whole = np.array([[0.0, 0.0, width, height]])
    output = head_tensor(
        [CanvasBox.at(placement.to_canvas(box)[0], score, 0) for box, score in ((inside, 0.9), (whole, 0.8))],
        2,
        4,
    )[None]
    [detections] = decode_batch(output, [placement], [reduced], INFO, Thresholds())
    assert [d.box for d in detections] == [
        pytest.approx(tuple(inside[0] * reduction)),  # by the reduction, not by 333 / 42 and 250 / 32
        pytest.approx((0.0, 0.0, 333.0, 250.0)),  # the rounded-up last block is clipped off
    ]


def test_a_box_wholly_past_the_source_edge_of_a_reduced_frame_is_dropped() -> None:
    reduced = frame(
        (333, 250), 8
    )  # 42 columns: column 41 covers source 328..336, of which 333.. is not there
    placement = Letterbox.fit((42, 32), (42, 42))
    past_the_edge = placement.to_canvas(np.array([[41.7, 5.0, 42.0, 10.0]]))[0]
    output = head_tensor([CanvasBox.at(past_the_edge, 0.9, 0)], 2, 4)[None]
    assert decode_batch(output, [placement], [reduced], INFO, Thresholds()) == [[]]


def test_class_ids_beyond_the_names_get_a_generated_label() -> None:
    rows = end_to_end_tensor([CanvasBox(0, 0, 10, 10, 0.9, 7)], 3)[None]
    placement = Letterbox.fit((640, 640), (640, 640))
    [[detection]] = decode_batch(rows, [placement], [frame((640, 640))], INFO, Thresholds())
    assert detection.label == "class7"


def test_max_detections_counts_the_boxes_left_after_suppression() -> None:
    head = head_tensor(
        [
            CanvasBox(0, 0, 100, 100, 0.9, 0),
            CanvasBox(1, 1, 100, 100, 0.8, 0),
            CanvasBox(200, 0, 300, 100, 0.7, 0),
        ],
        1,
        4,
    )
    found = decode_head(head, Thresholds(max_detections=2))
    assert found.scores.tolist() == pytest.approx([0.9, 0.7])


def test_a_class_id_outside_the_names_never_borrows_one() -> None:
    assert (INFO.label(1), INFO.label(2), INFO.label(-1)) == ("scratch", "class2", "class-1")
