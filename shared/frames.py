"""Frame limits of the wire contract, checked from the image header before anything decodes it.

Producers refuse frames over the limits; consumers dead-letter them. Both call :func:`inspect_frame`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

from shared.errors import FrameRejectedError, FrameTooLargeError, NotAnImageError

MAX_FRAME_BYTES = 8 * 1024 * 1024
MAX_FRAME_PIXELS = 40_000_000

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers carry the dimensions; C4 (DHT), C8 (JPG) and CC (DAC) are not frames.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_KNOWN_OTHERS = {b"GIF8": "GIF", b"BM": "BMP", b"RIFF": "RIFF/WebP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}

ImageFormat = Literal["jpeg", "png"]


@dataclass(frozen=True)
class FrameInfo:
    format: ImageFormat
    width: int
    height: int


def inspect_frame(body: bytes) -> FrameInfo:
    """Format and dimensions from the header, or :class:`FrameRejectedError` with a readable reason."""
    if not body:
        raise FrameRejectedError("empty body: no image")
    if len(body) > MAX_FRAME_BYTES:
        raise FrameTooLargeError(f"frame is {len(body)} bytes, over the {MAX_FRAME_BYTES}-byte limit")
    if body.startswith(JPEG_MAGIC):
        info = FrameInfo("jpeg", *_jpeg_size(body))
    elif body.startswith(PNG_MAGIC):
        info = FrameInfo("png", *_png_size(body))
    elif JPEG_MAGIC.startswith(body) or PNG_MAGIC.startswith(body):
        kind = "JPEG" if JPEG_MAGIC.startswith(body) else "PNG"
        raise FrameRejectedError(f"truncated {kind}: the body ends inside its signature")
    else:
        raise NotAnImageError(f"not a JPEG or PNG image ({_describe(body)})")
    _check_dimensions(info)
    return info


JPEG_END = b"\xff\xd9"
PNG_END = b"IEND\xaeB`\x82"


def is_complete_image(body: bytes) -> bool:
    """Whether a JPEG or PNG ends with its end marker: a file still being written does not yet.

    Some encoders pad a JPEG after its end-of-image marker, so trailing NUL bytes are allowed.
    """
    if body.startswith(JPEG_MAGIC):
        return body.rstrip(b"\x00").endswith(JPEG_END)
    if body.startswith(PNG_MAGIC):
        return body.endswith(PNG_END)
    return False


def _check_dimensions(info: FrameInfo) -> None:
    if info.width <= 0 or info.height <= 0:
        raise FrameRejectedError(f"{info.format} header declares {info.width}x{info.height} pixels")
    if info.width * info.height > MAX_FRAME_PIXELS:
        raise FrameTooLargeError(
            f"{info.format} header declares {info.width}x{info.height} pixels, over the "
            f"{MAX_FRAME_PIXELS // 1_000_000}-megapixel limit"
        )


def _describe(body: bytes) -> str:
    for magic, name in _KNOWN_OTHERS.items():
        if body.startswith(magic):
            return f"looks like {name}"
    return f"starts with {body[:8].hex(' ')}"


def _png_size(body: bytes) -> tuple[int, int]:
    if len(body) < 24 or body[12:16] != b"IHDR":
        raise FrameRejectedError("truncated PNG: no IHDR header")
    width, height = struct.unpack(">II", body[16:24])
    return width, height


def _jpeg_size(body: bytes) -> tuple[int, int]:
    """Walk the marker segments up to the first start-of-frame, which holds height and width."""
    offset = 2
    while offset + 4 <= len(body):
        if body[offset] != 0xFF:
            raise FrameRejectedError(f"corrupt JPEG: no marker at byte {offset}")
        marker = body[offset + 1]
        if marker == 0xFF:  # fill byte before a marker
            offset += 1
            continue
        length = struct.unpack(">H", body[offset + 2 : offset + 4])[0]
        if marker in _SOF_MARKERS:
            if offset + 9 > len(body):
                break
            height, width = struct.unpack(">HH", body[offset + 5 : offset + 9])
            return width, height
        if marker == 0xDA or length < 2:  # start of scan before any frame header
            break
        offset += 2 + length
    raise FrameRejectedError("truncated or corrupt JPEG: no frame header")
