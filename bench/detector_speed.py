"""Images per second of the detector stage (letterbox, inference, decoding) at several batch sizes.

    .venv/bin/python -m bench.detector_speed                      # a synthetic YOLOv8-shaped model, 640x640
    .venv/bin/python -m bench.detector_speed --model yolo11n.onnx --device cuda

Without --model it builds a random-weight convolutional model with a YOLOv8-shaped head [B, 84, 8400]
(tests/support/onnx_graphs.py: write_conv_head_model, about 3.5 GFLOPs an image against YOLOv8n's 8.7),
so the figures measure this code and ONNX Runtime on a graph of modest compute, not a trained detector.
"preprocess" is the letterbox into the reused input tensor alone, the part that runs on the CPU anyway.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from consumer.detector import DecodedFrame, Detector, DetectorConfig, load_detector
from consumer.detector.preprocess import InputBuffer
from tests.support.onnx_graphs import write_conv_head_model

T = TypeVar("T")  # a batch item: an image or a decoded frame


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="an ONNX detector; default: a synthetic one")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads, 0 lets ONNX Runtime choose")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--frame", default="1280x720", help="source frame size WxH")
    parser.add_argument("--min-images", type=int, default=64, help="images timed per batch size, at least")
    return parser.parse_args()


def frames(count: int, width: int, height: int) -> list[np.ndarray]:
    """Camera-sized frames with some structure (noise and a bright square) so nothing is trivially uniform."""
    rng = np.random.default_rng(0)
    images = []
    for index in range(count):
        image = rng.integers(0, 200, (height, width, 3), dtype=np.uint8)
        side = min(width, height) // 4
        image[index % 3 * side : index % 3 * side + side, side : 2 * side] = 255
        images.append(image)
    return images


def images_per_second(run: Callable[[list[T]], object], batch: list[T], min_images: int) -> float:
    rounds = max(1, -(-min_images // len(batch)))
    started = time.perf_counter()
    for _ in range(rounds):
        run(batch)
    return rounds * len(batch) / (time.perf_counter() - started)


def measure(detector: Detector, sizes: list[int], frame: tuple[int, int], min_images: int) -> None:
    info = detector.info
    print(f"model {info.name} on {info.provider}, input {info.input_size[0]}x{info.input_size[1]}, ", end="")
    print(f"batch {info.batch_size or 'dynamic'}, frames {frame[0]}x{frame[1]}")
    print(f"{'batch':>5} {'detect img/s':>13} {'preprocess img/s':>17}")
    for size in sizes:
        batch = frames(size, *frame)
        decoded = [DecodedFrame.of(image) for image in batch]
        detector.detect(decoded)  # first run at this size: allocations, and kernel choice on CUDA
        total = images_per_second(detector.detect, decoded, min_images)
        prepare = images_per_second(InputBuffer(info.input_size).fill, batch, min_images)
        print(f"{size:>5} {total:>13.1f} {prepare:>17.1f}")


def main() -> None:
    arguments = _arguments()
    sizes = [int(size) for size in arguments.batches.split(",")]
    width, height = (int(part) for part in arguments.frame.lower().split("x"))
    with tempfile.TemporaryDirectory() as scratch:
        model = arguments.model or write_conv_head_model(Path(scratch) / "synthetic-yolov8-head.onnx")
        config = DetectorConfig(model_path=model, device=arguments.device, intra_op_threads=arguments.threads)
        measure(load_detector(config), sizes, (width, height), arguments.min_images)


if __name__ == "__main__":
    main()
