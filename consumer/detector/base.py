"""The inference seam: a batch of decoded frames in, a list of detections per frame out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from shared.errors import DetfleetError

Box = tuple[float, float, float, float]
REDUCTIONS = (1, 2, 4, 8)  # the scales libjpeg decodes at directly: 1/1, 1/2, 1/4, 1/8


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


@dataclass(frozen=True, eq=False)  # eq=False: comparing pixel arrays with == is not a truth value
class DecodedFrame:
    """One frame as the detector takes it: its pixels, possibly decoded at a reduced scale, and the size of
    the frame they came from, so that boxes come back in the frame's own pixels.

    At reduction r (libjpeg's 1/r) pixel x of ``pixels`` spans source pixels r*x to r*x + r, and the reduced
    size is rounded up (ceil(width / r)): the last column covers a partial block. Boxes therefore map back
    by r itself, not by source / reduced size, which would drift by up to r - 1 pixels at the far edge.
    """

    pixels: np.ndarray  # 8-bit BGR from consumer.decode.decode_frame; any layout to_bgr8 reads is accepted
    source_size: tuple[int, int]  # (width, height) of the original frame
    reduction: int = 1  # one of REDUCTIONS

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction}")
        width, height = self.source_size
        expected = (-(-height // self.reduction), -(-width // self.reduction))
        if tuple(self.pixels.shape[:2]) != expected:
            raise ValueError(
                f"pixels of shape {self.pixels.shape} are not a {width}x{height} frame at 1/{self.reduction}"
            )

    @classmethod
    def of(cls, image: np.ndarray) -> DecodedFrame:
        """An image at full scale: its own size is the source size."""
        return cls(image, (int(image.shape[1]), int(image.shape[0])))

    def to_source(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes [N, 4] (x1, y1, x2, y2) in pixels of ``pixels`` to source pixels, clipped to the frame."""
        limits = np.array([*self.source_size, *self.source_size], dtype=boxes.dtype)
        clipped: np.ndarray = np.clip(boxes * self.reduction, 0, limits)
        return clipped


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
    def detect(self, frames: Sequence[DecodedFrame]) -> list[list[Detection]]:
        """Detections per frame, in input order, boxes in source pixels. Raises InferenceError when the
        runtime fails the batch."""

    def warm_up(self) -> None:  # noqa: B027 - a detector with nothing to warm keeps the no-op
        """Run once before the first real batch, so that batch does not pay for lazy initialisation."""
