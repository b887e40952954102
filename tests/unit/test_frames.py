"""Frame limits: format by magic bytes, dimensions from the header, before any decoding."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from shared.errors import FrameRejectedError
from shared.frames import MAX_FRAME_BYTES, inspect_frame


def encoded(ext: str, width: int = 64, height: int = 48, channels: int = 3) -> bytes:
    image = np.zeros((height, width, channels), np.uint8)
    ok, data = cv2.imencode(ext, image)
    assert ok
    return bytes(data)


def png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def test_jpeg_and_png_dimensions_come_from_the_header() -> None:
    assert inspect_frame(encoded(".jpg", 640, 480)).width == 640
    info = inspect_frame(encoded(".png", 33, 17, channels=4))
    assert (info.format, info.width, info.height) == ("png", 33, 17)


def test_the_format_is_judged_by_magic_bytes_alone() -> None:
    assert inspect_frame(encoded(".png")).format == "png"  # whatever content_type a producer claims


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty body"),
        (b"GIF89a\x01\x00\x01\x00", "looks like GIF"),
        (encoded(".bmp"), "looks like BMP"),
        (b"hello world", "not a JPEG or PNG"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "truncated or corrupt JPEG"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "truncated PNG"),
        (png_header_only(100_000, 100_000), "over the 40-megapixel limit"),
        (png_header_only(0, 10), "declares 0x10 pixels"),
    ],
)
def test_bad_frames_are_refused_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(FrameRejectedError, match=reason):
        inspect_frame(body)


def test_a_jpeg_declaring_huge_dimensions_is_refused_before_decoding() -> None:
    body = bytearray(encoded(".jpg", 64, 48))
    sof = body.index(b"\xff\xc0")
    body[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)
    with pytest.raises(FrameRejectedError, match="60000x60000"):
        inspect_frame(bytes(body))


def test_an_oversized_body_is_refused() -> None:
    with pytest.raises(FrameRejectedError, match="over the 8388608-byte limit"):
        inspect_frame(encoded(".jpg") + b"\x00" * MAX_FRAME_BYTES)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\x89PN", "truncated PNG: the body ends inside its signature"),
        (b"\x89PNG\r\n\x1a", "truncated PNG: the body ends inside its signature"),
        (b"\xff", "truncated JPEG: the body ends inside its signature"),
        (b"\xff\xd8", "truncated JPEG: the body ends inside its signature"),
    ],
)
def test_a_body_cut_inside_the_signature_is_called_truncated(body: bytes, reason: str) -> None:
    with pytest.raises(FrameRejectedError) as refused:
        inspect_frame(body)
    assert str(refused.value) == reason
