"""A deterministic detector for tests without a model: predictable boxes, chosen failures, a call record."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np

from consumer.detector.base import DecodedFrame, Detection, Detector, InferenceError, ModelInfo

FAKE_MODEL_NAME = "fake-detector.onnx"


def fake_model_info(class_names: tuple[str, ...] = ("object",)) -> ModelInfo:
    return ModelInfo(
        name=FAKE_MODEL_NAME,
        sha256=hashlib.sha256(FAKE_MODEL_NAME.encode()).hexdigest(),
        provider="CPUExecutionProvider",
        class_names=class_names,
        input_size=(640, 640),
        batch_size=None,
    )


class FakeDetector(Detector):
    """Detection i of every frame: class i mod len(class_names), score 0.9 - 0.1 i, a box from (i, i) to the
    source frame's centre plus i, in source pixels whatever scale the frame was decoded at. A batch with any
    frame whose pixels fail_on accepts raises InferenceError, as a poison message would; batch_sizes
    records every call, failed ones included."""

    def __init__(
        self,
        detections_per_image: int = 1,
        fail_on: Callable[[np.ndarray], bool] | None = None,
        class_names: tuple[str, ...] = ("object",),
    ) -> None:
        if not 0 <= detections_per_image <= 9:
            raise ValueError("detections_per_image must be 0..9 so every score stays positive")
        self.info = fake_model_info(class_names)
        self.detections_per_image = detections_per_image
        self.fail_on = fail_on
        self.batch_sizes: list[int] = []
        self.warm_ups = 0

    def detect(self, frames: Sequence[DecodedFrame]) -> list[list[Detection]]:
        self.batch_sizes.append(len(frames))
        if self.fail_on is not None and any(self.fail_on(frame.pixels) for frame in frames):
            raise InferenceError(f"{FAKE_MODEL_NAME}: a poison image in a batch of {len(frames)}")
        return [self._detections(frame) for frame in frames]

    def warm_up(self) -> None:
        self.warm_ups += 1

    def _detections(self, frame: DecodedFrame) -> list[Detection]:
        width, height = frame.source_size
        return [self._detection(i, width, height) for i in range(self.detections_per_image)]

    def _detection(self, index: int, width: int, height: int) -> Detection:
        class_id = index % len(self.info.class_names)
        box = (
            float(min(index, width)),
            float(min(index, height)),
            float(min(width / 2 + index, width)),
            float(min(height / 2 + index, height)),
        )
        return Detection(class_id, self.info.class_names[class_id], round(0.9 - 0.1 * index, 6), box)
