"""The ONNX Runtime detector: CUDA with IO binding where the session really runs on it, else the CPU."""

from __future__ import annotations

import ast
import hashlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from consumer.detector.base import (
    DecodedFrame,
    Detection,
    Detector,
    DetectorConfig,
    InferenceError,
    ModelInfo,
    ModelLoadError,
)
from consumer.detector.postprocess import Thresholds, decode_batch
from consumer.detector.preprocess import PAD_VALUE, InputBuffer

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEFAULT_INPUT_SIZE = (640, 640)  # (width, height) where neither the graph nor the metadata says
MAX_CLASSES = 100_000  # a names dict with a larger key is refused rather than allocated


class OnnxDetector(Detector):
    def __init__(self, config: DetectorConfig, session: ort.InferenceSession, info: ModelInfo) -> None:
        self._session = session
        self._input_name: str = session.get_inputs()[0].name
        self._output_name: str = session.get_outputs()[0].name
        self._thresholds = Thresholds(config.confidence, config.iou, config.max_detections)
        self._warmed = False
        self._input = InputBuffer(info.input_size)
        self._lock = threading.Lock()
        self.info = info

    def detect(self, frames: Sequence[DecodedFrame]) -> list[list[Detection]]:
        if not frames:
            return []
        with self._lock:  # the input buffer is shared between calls
            pixels = [frame.pixels for frame in frames]
            blob, placements = self._input.fill(pixels, rows=self._padded_rows(len(frames)))
            output = self._infer(blob)[: len(frames)]
        return decode_batch(output, placements, frames, self.info, self._thresholds)

    def warm_up(self) -> None:
        """Runs one grey batch the first time only; CUDA's first run pays for kernel selection and JIT."""
        if self._warmed:
            return
        width, height = self.info.input_size
        self.detect([DecodedFrame.of(np.full((height, width, 3), PAD_VALUE, np.uint8))])
        self._warmed = True

    def _padded_rows(self, images: int) -> int:
        """A fixed-batch model needs whole batches: the last chunk is filled up with grey images."""
        chunk = self.info.batch_size or 1
        return -(-images // chunk) * chunk

    def _infer(self, blob: np.ndarray) -> np.ndarray:
        """Runs the whole blob, in chunks of the model's batch size where that size is fixed."""
        chunk = self.info.batch_size
        if chunk is None:
            return self._run(blob)
        return np.concatenate(
            [self._run(blob[start : start + chunk]) for start in range(0, len(blob), chunk)]
        )

    def _run(self, blob: np.ndarray) -> np.ndarray:
        try:
            if self.info.provider == CUDA:
                return self._run_bound(blob)
            output: np.ndarray = self._session.run([self._output_name], {self._input_name: blob})[0]
        except Exception as error:  # ONNX Runtime's errors derive from Exception alone
            raise InferenceError(_one_line(f"{self.info.name}: {error}")) from error
        return output

    def _run_bound(self, blob: np.ndarray) -> np.ndarray:
        """IO binding: the input is copied to the GPU once and the output stays there until fetched."""
        binding = self._session.io_binding()
        binding.bind_cpu_input(self._input_name, blob)
        binding.bind_output(self._output_name, "cuda")
        self._session.run_with_iobinding(binding)
        output: np.ndarray = binding.copy_outputs_to_cpu()[0]
        return output


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---- loading ---------------------------------------------------------------------------------------------


def load_onnx_detector(config: DetectorConfig) -> OnnxDetector:
    """Loads, describes and warms up the model; every failure is a ModelLoadError naming the path."""
    path = config.model_path
    sha256 = _sha256(path)
    session = _session(config)
    provider = _check_provider(session, config)
    metadata = session.get_modelmeta().custom_metadata_map
    input_shape = list(session.get_inputs()[0].shape)
    output_shape = list(session.get_outputs()[0].shape)
    info = ModelInfo(
        name=path.name,
        sha256=sha256,
        provider=provider,
        class_names=_class_names(config, metadata, output_shape),
        input_size=_input_size(path, input_shape, metadata),
        batch_size=input_shape[0] if isinstance(input_shape[0], int) and input_shape[0] > 0 else None,
    )
    logger.info(
        "Model %s (sha256 %s) runs on %s (device setting %s, input %dx%d, batch %s, %d classes)",
        info.name,
        info.sha256[:12],
        info.provider,
        config.device,
        *info.input_size,
        info.batch_size or "dynamic",
        len(info.class_names),
    )
    detector = OnnxDetector(config, session, info)
    detector.warm_up()
    return detector


def _sha256(path: Path) -> str:
    try:
        with path.open("rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    except OSError as error:
        raise ModelLoadError(f"cannot read model {path}: {error.strerror or error}") from None


def _session(config: DetectorConfig) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    # Spinning threads steal the cores that decoding, the event loop, the broker and Postgres need; on
    # 2 cores turning it off raised raw inference from 87 to 107-142 img/s (make bench).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    wanted = [CPU] if config.device == "cpu" else [CUDA, CPU]
    # The CPU wheel (the `cpu` extra) has no CUDA provider at all, and asking for it would fail the load.
    providers = [p for p in wanted if p in ort.get_available_providers()] or [CPU]
    try:
        return ort.InferenceSession(str(config.model_path), sess_options=options, providers=providers)
    except Exception as error:  # ONNX Runtime's errors derive from Exception alone
        raise ModelLoadError(_one_line(f"cannot load model {config.model_path}: {error}")) from None


def _check_provider(session: ort.InferenceSession, config: DetectorConfig) -> str:
    """The provider the session really got: asking for CUDA succeeds even where no GPU or CUDA library is."""
    provider: str = session.get_providers()[0]
    if config.device == "cuda" and provider != CUDA:
        raise ModelLoadError(
            f"cannot load model {config.model_path} on CUDA: the session fell back to {provider}"
        )
    return provider


def _input_size(path: Path, shape: list[Any], metadata: dict[str, str]) -> tuple[int, int]:
    """(width, height) from the graph's NCHW input, else the metadata's imgsz, else 640 x 640."""
    if len(shape) != 4:
        raise ModelLoadError(f"cannot use model {path}: expected an NCHW image input, got shape {shape}")
    height, width = shape[2], shape[3]
    if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
        return width, height
    if "imgsz" in metadata:
        return _imgsz(path, metadata["imgsz"])
    return DEFAULT_INPUT_SIZE


def _imgsz(path: Path, text: str) -> tuple[int, int]:
    """ultralytics writes imgsz as "[height, width]" (or one int for a square)."""
    value = _literal(path, "imgsz", text)
    if isinstance(value, int) and value > 0:
        return value, value
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) and v > 0 for v in value)
    ):
        return value[1], value[0]
    raise ModelLoadError(f"cannot use model {path}: metadata imgsz {text[:80]!r} is not [height, width]")


def _class_names(
    config: DetectorConfig, metadata: dict[str, str], output_shape: list[Any]
) -> tuple[str, ...]:
    """The labels file if given, else the names metadata, else class<N> for each class the head has."""
    if config.labels_path is not None:
        return _labels_file(config.labels_path)
    if "names" in metadata:
        return _names_metadata(config.model_path, metadata["names"])
    rows = output_shape[1] if len(output_shape) == 3 else None
    count = rows - 4 if isinstance(rows, int) and rows > 4 and output_shape[2] != 6 else 0
    return tuple(f"class{i}" for i in range(count))


def _labels_file(path: Path) -> tuple[str, ...]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"cannot read labels file {path}: {error}") from None
    return tuple(line.strip() for line in lines if line.strip())


def _names_metadata(path: Path, text: str) -> tuple[str, ...]:
    """ultralytics stores names as a Python dict literal {0: 'person', ...}; a list literal is fine too."""
    value = _literal(path, "names", text)
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        return tuple(value)
    if isinstance(value, dict) and _is_names_dict(value):
        return tuple(value.get(i, f"class{i}") for i in range(max(value, default=-1) + 1))
    raise ModelLoadError(f"cannot use model {path}: metadata names is not a dict of class id to name")


def _is_names_dict(value: dict[Any, Any]) -> bool:
    ids_ok = all(isinstance(key, int) and 0 <= key < MAX_CLASSES for key in value)
    return ids_ok and all(isinstance(name, str) for name in value.values())


def _literal(path: Path, key: str, text: str) -> Any:
    """Parses a metadata value as a Python literal only: ast.literal_eval never calls or imports anything."""
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ModelLoadError(
            f"cannot use model {path}: metadata {key} is not a literal: {text[:80]!r}"
        ) from None
