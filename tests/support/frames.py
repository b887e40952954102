"""Small test images and videos made with OpenCV: deterministic for a given seed."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray


def image(width: int = 64, height: int = 48, *, seed: int = 0, channels: int = 3) -> NDArray[np.uint8]:
    """A noisy image (noise keeps JPEG from compressing it to nothing)."""
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def jpeg_bytes(width: int = 64, height: int = 48, *, seed: int = 0, quality: int = 90) -> bytes:
    ok, encoded = cv2.imencode(
        ".jpg", image(width, height, seed=seed), [int(cv2.IMWRITE_JPEG_QUALITY), quality]
    )
    assert ok
    return encoded.tobytes()


def png_bytes(width: int = 64, height: int = 48, *, seed: int = 0, channels: int = 3) -> bytes:
    ok, encoded = cv2.imencode(".png", image(width, height, seed=seed, channels=channels))
    assert ok
    return encoded.tobytes()


def jpeg_of_size(target_bytes: int, *, seed: int = 0, quality: int = 90) -> bytes:
    """A noise JPEG of roughly ``target_bytes``: noise at quality 90 costs about 1.1 bytes a pixel."""
    pixels = max(target_bytes / 1.1, 64)
    width = int((pixels * 4 / 3) ** 0.5)
    return jpeg_bytes(width, max(int(width * 3 / 4), 8), seed=seed, quality=quality)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR declaring ``width`` x ``height``: enough for the header checks."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def write_video(path: Path, frames: int = 5, width: int = 64, height: int = 48, fps: float = 10.0) -> Path:
    """An MJPG AVI of ``frames`` distinct frames (frame i is filled with grey level 40 * i)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (width, height))
    assert writer.isOpened(), "OpenCV has no MJPG writer"
    for index in range(frames):
        writer.write(np.full((height, width, 3), (40 * index) % 256, np.uint8))
    writer.release()
    return path
