"""The fake detector the consumer's unit tests run on: deterministic, chosen failures, a call record."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from consumer.detector import DecodedFrame, Detector, InferenceError
from consumer.detector.fake import FakeDetector
from shared.errors import DetfleetError


def full_scale(images: Sequence[np.ndarray]) -> list[DecodedFrame]:
    """Arrays as frames decoded at full scale, their own size the source size."""
    return [DecodedFrame.of(image) for image in images]


def image(width: int = 64, height: int = 48, value: int = 0) -> np.ndarray:
    return np.full((height, width, 3), value, np.uint8)


def test_it_is_a_detector_with_model_info() -> None:
    fake = FakeDetector()
    assert isinstance(fake, Detector)
    assert fake.info.name.endswith(".onnx")
    assert len(fake.info.sha256) == 64


def test_detections_are_deterministic_and_inside_each_image() -> None:
    fake = FakeDetector(detections_per_image=3, class_names=("part", "scratch"))
    first = fake.detect(full_scale([image(64, 48), image(10, 200)]))
    assert first == FakeDetector(detections_per_image=3, class_names=("part", "scratch")).detect(
        full_scale([image(64, 48), image(10, 200)])
    )
    assert [[d.label for d in found] for found in first] == [["part", "scratch", "part"]] * 2
    assert [d.score for d in first[0]] == pytest.approx([0.9, 0.8, 0.7])
    assert first[0][0].box == (0.0, 0.0, 32.0, 24.0)
    for (width, height), found in zip([(64, 48), (10, 200)], first, strict=True):
        for detection in found:
            x1, y1, x2, y2 = detection.box
            assert 0 <= x1 < x2 <= width
            assert 0 <= y1 < y2 <= height


def test_no_detections_can_be_asked_for() -> None:
    assert FakeDetector(detections_per_image=0).detect(full_scale([image(), image()])) == [[], []]


def test_a_poison_image_fails_its_whole_batch_and_every_batch_is_recorded() -> None:
    fake = FakeDetector(fail_on=lambda picture: bool(picture[0, 0, 0] == 255))
    clean, poison = image(), image(value=255)
    with pytest.raises(InferenceError) as raised:
        fake.detect(full_scale([clean, poison, clean, clean]))
    assert isinstance(raised.value, DetfleetError)
    with pytest.raises(InferenceError):
        fake.detect(full_scale([clean, poison]))
    assert len(fake.detect(full_scale([clean, clean]))) == 2
    assert fake.batch_sizes == [4, 2, 2]


def test_warm_up_is_counted() -> None:
    fake = FakeDetector()
    fake.warm_up()
    assert fake.warm_ups == 1
    assert fake.batch_sizes == []


def test_impossible_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="detections_per_image"):
        FakeDetector(detections_per_image=10)
