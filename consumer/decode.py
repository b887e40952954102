"""Frame bodies to images: runs in the decode pool, where cv2 releases the GIL."""

from __future__ import annotations

import cv2
import numpy as np

from consumer.detector.preprocess import to_bgr8


def decode_image(body: bytes) -> np.ndarray | str:
    """The frame as an 8-bit BGR image, or the reason it cannot be one (runs in the decode pool)."""
    image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        return "corrupt or truncated image: OpenCV could not decode it"
    try:
        return to_bgr8(image)
    except ValueError as error:
        return f"unsupported image layout: {error}"
