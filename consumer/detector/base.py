"""The inference seam: a batch of images in, a list of detections per image out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from shared.errors import DetfleetError

Box = tuple[float, float, float, float]


class ModelLoadError(DetfleetError):
    """The model file is missing, corrupt or not a detector this package runs; the message names the path."""


class InferenceError(DetfleetError):
    """detect() failed inside the runtime: a transient failure of the whole batch, no culprit named."""


@dataclass(frozen=True)
class Detection:
    class_id: int
    label: str
    score: float
    box: Box  # x1, y1, x2, y2 in source image pixels, clipped to the image

    def to_json(self) -> dict[str, object]:
        return {"class_id": self.class_id, "label": self.label, "score": self.score, "box": list(self.box)}


@dataclass(frozen=True)
class ModelInfo:
    name: str  # file name of the model
    sha256: str  # of the model file, computed at load
    provider: str  # the execution provider the session really uses
    class_names: tuple[str, ...]
    input_size: tuple[int, int]  # (width, height)
    batch_size: int | None  # None: the model takes any batch size

    def label(self, class_id: int) -> str:
        """The class name, or class<N> where the model names fewer classes than it predicts."""
        if 0 <= class_id < len(self.class_names):
            return self.class_names[class_id]
        return f"class{class_id}"


@dataclass(frozen=True)
class DetectorConfig:
    model_path: Path
    labels_path: Path | None = None  # one class name a line; wins over the model's own metadata
    confidence: float = 0.25
    iou: float = 0.45
    max_detections: int = 300
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA where the session really gets it, else CPU
    intra_op_threads: int = 0  # 0 lets ONNX Runtime choose


class Detector(ABC):
    """One model, loaded once; detect() is called from a single inference thread."""

    info: ModelInfo

    @abstractmethod
    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Detections per image, in input order. Raises InferenceError when the runtime fails the batch."""

    def warm_up(self) -> None:  # noqa: B027 - a detector with nothing to warm keeps the no-op
        """Run once before the first real batch, so that batch does not pay for lazy initialisation."""
