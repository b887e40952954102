"""Object detection behind one interface: an ONNX Runtime implementation and a fake for tests."""

from consumer.detector.base import (
    DecodedFrame,
    Detection,
    Detector,
    DetectorConfig,
    InferenceError,
    ModelInfo,
    ModelLoadError,
)
from consumer.detector.onnx import OnnxDetector, load_onnx_detector
from consumer.detector.preprocess import to_bgr8


def load_detector(config: DetectorConfig) -> Detector:
    """The ONNX Runtime detector for config, loaded and warmed up. Raises ModelLoadError (a DetfleetError)."""
    return load_onnx_detector(config)


__all__ = [
    "DecodedFrame",
    "Detection",
    "Detector",
    "DetectorConfig",
    "InferenceError",
    "ModelInfo",
    "ModelLoadError",
    "OnnxDetector",
    "load_detector",
    "to_bgr8",
]
