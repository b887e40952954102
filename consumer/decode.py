"""Frame bodies to decoded frames: the one seam the fleet and the in-process detector both decode through.

A JPEG is decoded at the smallest scale libjpeg offers (1/2, 1/4, 1/8) that still covers the model's input
once the letterbox has scaled the frame to fit, so libjpeg skips most of the IDCT work and the letterbox
has little or nothing left to resize (25% less decode and letterbox per frame for 640x480 frames and a 320
model: bench/decode_scale.py). PNG has no reduced decode and is decoded at full scale. The reduction is
chosen from the header's dimensions (shared.frames.inspect_frame) before anything is decoded. Runs in the
decode pool, where cv2 releases the GIL.
"""

from __future__ import annotations

import cv2
import numpy as np

from consumer.detector.base import REDUCTIONS, DecodedFrame
from consumer.detector.preprocess import Letterbox, to_bgr8
from shared.errors import FrameRejectedError
from shared.frames import FrameInfo, inspect_frame

# IMREAD_REDUCED_COLOR_* applies EXIF orientation, IMREAD_UNCHANGED does not: ignore it at every scale so a
# frame keeps the orientation (and the source size) its header declares, as before reduced decoding.
_REDUCED_FLAGS = {
    2: cv2.IMREAD_REDUCED_COLOR_2 | cv2.IMREAD_IGNORE_ORIENTATION,
    4: cv2.IMREAD_REDUCED_COLOR_4 | cv2.IMREAD_IGNORE_ORIENTATION,
    8: cv2.IMREAD_REDUCED_COLOR_8 | cv2.IMREAD_IGNORE_ORIENTATION,
}
UNDECODABLE = "corrupt or truncated image: OpenCV could not decode it"


def decode_frame(body: bytes, input_size: tuple[int, int]) -> DecodedFrame | str:
    """The frame decoded for a model of ``input_size`` (width, height), or the reason it cannot be."""
    try:
        header = inspect_frame(body)
    except FrameRejectedError as error:
        return str(error)
    return decode_at(body, header, reduction_for(header, input_size))


def reduction_for(header: FrameInfo, input_size: tuple[int, int]) -> int:
    """The largest libjpeg reduction whose image is still at least the letterbox's resized size on both
    axes (ceil(width / r): libjpeg rounds up), so the letterbox only ever shrinks; 1 for PNG."""
    if header.format != "jpeg":
        return 1
    fitted_width, fitted_height = Letterbox.fit((header.width, header.height), input_size).resized_size
    for reduction in sorted(REDUCTIONS, reverse=True):
        if -(-header.width // reduction) >= fitted_width and -(-header.height // reduction) >= fitted_height:
            return reduction
    return 1


def decode_at(body: bytes, header: FrameInfo, reduction: int) -> DecodedFrame | str:
    """The frame at 1/``reduction`` (1: full scale, any layout to_bgr8 reads), or why it cannot be."""
    flags = _REDUCED_FLAGS[reduction] if reduction > 1 else cv2.IMREAD_UNCHANGED
    image = cv2.imdecode(np.frombuffer(body, np.uint8), flags)
    if image is None or image.size == 0:
        return UNDECODABLE
    try:
        pixels = to_bgr8(image)
    except ValueError as error:
        return f"unsupported image layout: {error}"
    try:
        return DecodedFrame(pixels, (header.width, header.height), reduction)
    except ValueError:
        height, width = pixels.shape[:2]
        return (
            f"{header.format} header declares {header.width}x{header.height} pixels but the image"
            f" decodes to {width}x{height} at 1/{reduction}"
        )
