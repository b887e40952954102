"""Hypothesis strategies for detection messages, good and malformed, each tagged with what must become of it.

A :class:`FuzzMessage` is a body, a routing key and the AMQP properties to send as given (through pika, which
sends non-UTF-8 short strings and out-of-range timestamps that aio-pika refuses to build), plus the row
statuses the consumer may give it and, for a bad one, a pattern its failure reason must match.

Not generated: a timestamp *inside* the headers table that Python cannot represent. pika cannot decode it
either, so the quarantine sweep cannot move it aside (see :mod:`shared.broker.quarantine`); such a message
needs an operator, and a consumer meeting it reconnects over and over. In-range timestamps in headers are
generated (a header of the wrong type).
"""

from __future__ import annotations

import base64
import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import cv2
import numpy as np
import pika
from hypothesis import strategies as st

from shared.frames import JPEG_MAGIC, MAX_FRAME_BYTES, PNG_MAGIC
from shared.schema import (
    H_ATTEMPT,
    H_CAMERA,
    H_CAPTURED_AT,
    H_DEADLINE,
    H_SCHEMA,
    H_SITE,
    H_TRACE_ID,
    format_time,
)
from tests.support.frames import png_header_only

# Every fuzz message carries this header with a case name unique in the run: it travels into the DLQ copy.
CASE_HEADER = "x-fuzz-case"
OK = frozenset({"ok"})
FAILED = frozenset({"failed"})
OK_OR_FAILED = frozenset({"ok", "failed"})
OK_OR_SHED = frozenset({"ok", "shed"})
SHED = frozenset({"shed"})
NOT_UTF8 = st.sampled_from([b"\xff", b"\xfe\xff", b"cam\xc3", b"\x80abc", b"ok\xed\xa0\x80"])

# A 16x12 CMYK JPEG (Adobe APP14, four components), made once with Pillow: OpenCV cannot write CMYK.
CMYK_JPEG = base64.b64decode(
    "/9j/7gAOQWRvYmUAZAAAAAAA/9sAQwAGBAUGBQQGBgUGBwcGCAoQCgoJCQoUDg8MEBcUGBgXFBYWGh0lHxobIxwWFiAsICMmJykq"
    "KRkfLTAtKDAlKCko/8AAFAgADAAQBEMRAE0RAFkRAEsRAP/EAB8AAAEFAQEBAQEBAAAAAAAAAAABAgMEBQYHCAkKC//EALUQAAIB"
    "AwMCBAMFBQQEAAABfQECAwAEEQUSITFBBhNRYQcicRQygZGhCCNCscEVUtHwJDNicoIJChYXGBkaJSYnKCkqNDU2Nzg5OkNERUZH"
    "SElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6g4SFhoeIiYqSk5SVlpeYmZqio6Slpqeoqaqys7S1tre4ubrCw8TFxsfIycrS09TV"
    "1tfY2drh4uPk5ebn6Onq8fLz9PX29/j5+v/aAA4EQwBNAFkASwAAPwD1/wCJP/LX8a9M/wCFk/8ATb9a9Zr6Br5U+JP/AC1/Gj/h"
    "ZP8A02/Wiivqv4k/8tfxr5L/ALdv/wDnrRRXyp8Sf+Wv40f27f8A/PWiiv/Z"
)


@dataclass(frozen=True)
class FuzzMessage:
    """One message to publish, and what the consumer must make of it."""

    kind: str
    routing_key: str
    body: bytes
    properties: dict[str, Any]
    expected: frozenset[str]
    reason: str | None = None  # a regular expression the failure reason must match
    undecodable: bool = False  # aiormq cannot decode its properties: the quarantine sweep moves it aside
    headers_absent: bool = False

    @property
    def task_id(self) -> uuid.UUID | None:
        """The row key the consumer must use, when the message carries a UUID message_id it can read."""
        message_id = self.properties.get("message_id")
        if not isinstance(message_id, str):
            return None
        try:
            return uuid.UUID(message_id)
        except ValueError:
            return None

    def pika_properties(self, case: str) -> pika.BasicProperties:
        values = dict(self.properties)
        if not self.headers_absent:
            values["headers"] = {**values.get("headers", {}), CASE_HEADER: case}
        return pika.BasicProperties(delivery_mode=2, **values)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Hypothesis prints examples with this (it would list every field of a dataclass)."""
        printer.text(repr(self))

    def __repr__(self) -> str:  # bodies can be megabytes: a falsifying example must stay readable
        headers = {k: _short(v) for k, v in self.properties.get("headers", {}).items()}
        others = {k: _short(v) for k, v in self.properties.items() if k != "headers"}
        return (
            f"FuzzMessage({self.kind}, {self.routing_key!r}, body {len(self.body)} bytes "
            f"{self.body[:12]!r}, {others}, headers {headers}, expected {sorted(self.expected)})"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} chars)"


# ---- images ------------------------------------------------------------------------------------------------


def _noise(width: int, height: int, channels: int, seed: int, dtype: Any = np.uint8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    top = 65536 if dtype == np.uint16 else 256
    return rng.integers(0, top, size=shape, dtype=dtype)


def _encode(extension: str, image: np.ndarray, *params: int) -> bytes:
    ok, encoded = cv2.imencode(extension, image, list(params))
    assert ok, extension
    return encoded.tobytes()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _handmade_png(width: int, height: int, color_type: int, pixel_bytes: int, extra: bytes = b"") -> bytes:
    """A PNG of a layout OpenCV cannot write (grey+alpha, palette): rows of filter 0 and a ramp of bytes."""
    row = b"\x00" + bytes(i % 256 for i in range(width * pixel_bytes))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + extra
        + _png_chunk(b"IDAT", zlib.compress(row * height))
        + _png_chunk(b"IEND", b"")
    )


def _palette_png(width: int, height: int) -> bytes:
    palette = bytes(range(256)) * 3
    return _handmade_png(width, height, 3, 1, _png_chunk(b"PLTE", palette) + _png_chunk(b"tRNS", b"\x80" * 8))


sizes = st.tuples(st.integers(1, 96), st.integers(1, 72))
seeds = st.integers(0, 2**16)


GOOD_IMAGE_KINDS = (
    "jpeg-colour",
    "jpeg-grey",
    "jpeg-progressive",
    "jpeg-cmyk",
    "png-colour",
    "png-grey",
    "png-rgba",
    "png-grey-16bit",
    "png-colour-16bit",
    "png-rgba-16bit",
    "png-grey-alpha",
    "png-palette",
    "png-strip",
)


@st.composite
def good_images(draw: st.DrawFn, kind: str | None = None) -> tuple[str, bytes]:
    """(kind, body) of an image the contract accepts: any layout OpenCV decodes, JPEG or PNG."""
    (width, height), seed = draw(sizes), draw(seeds)
    makers = {
        "jpeg-colour": lambda: _encode(".jpg", _noise(width, height, 3, seed)),
        "jpeg-grey": lambda: _encode(".jpg", _noise(width, height, 1, seed)),
        "jpeg-progressive": lambda: _encode(
            ".jpg", _noise(width, height, 3, seed), cv2.IMWRITE_JPEG_PROGRESSIVE, 1
        ),
        "jpeg-cmyk": lambda: CMYK_JPEG,
        "png-colour": lambda: _encode(".png", _noise(width, height, 3, seed)),
        "png-grey": lambda: _encode(".png", _noise(width, height, 1, seed)),
        "png-rgba": lambda: _encode(".png", _noise(width, height, 4, seed)),
        "png-grey-16bit": lambda: _encode(".png", _noise(width, height, 1, seed, np.uint16)),
        "png-colour-16bit": lambda: _encode(".png", _noise(width, height, 3, seed, np.uint16)),
        "png-rgba-16bit": lambda: _encode(".png", _noise(width, height, 4, seed, np.uint16)),
        "png-grey-alpha": lambda: _handmade_png(width, height, 4, 2),
        "png-palette": lambda: _palette_png(width, height),
        "png-strip": lambda: _encode(".png", _noise(1200, 1, 3, seed)),
    }
    kind = kind or draw(st.sampled_from(GOOD_IMAGE_KINDS))
    return kind, makers[kind]()


def _jpeg_declaring(width: int, height: int) -> bytes:
    """SOI and a baseline frame header declaring ``width`` x ``height``, then a little junk."""
    sof = struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8\xff\xc0" + sof + b"\xff\xda" + b"\x00" * 16


BAD_BODY_KINDS = (
    "empty",
    "random",
    "gif",
    "bmp",
    "tiff",
    "webp",
    "truncated-jpeg",
    "truncated-png",
    "magic-then-junk",
    "bomb-png",
    "bomb-jpeg",
    "zero-size-png",
    "png-header-then-nothing",
    "over-8-mib",
)


@st.composite
def bad_bodies(draw: st.DrawFn, kind: str) -> tuple[str, bytes, frozenset[str], str]:
    """(kind, body, expected statuses, reason pattern) of a body the contract refuses."""
    (width, height), seed = draw(sizes), draw(seeds)
    image = _noise(width, height, 3, seed)
    if kind == "empty":
        return kind, b"", FAILED, "empty body"
    if kind == "random":
        body = draw(st.binary(min_size=1, max_size=2048).filter(_not_an_image_magic))
        return kind, body, FAILED, "not a JPEG or PNG"
    if kind == "gif":
        return kind, b"GIF89a" + struct.pack("<HH", width, height) + b"\x00" * 20 + b";", FAILED, "GIF"
    if kind in ("bmp", "tiff", "webp"):
        named = {"bmp": "BMP", "tiff": "TIFF", "webp": "RIFF/WebP"}[kind]
        return kind, _encode(f".{kind}", image), FAILED, f"not a JPEG or PNG image \\(looks like {named}\\)"
    if kind in ("truncated-jpeg", "truncated-png"):
        whole = _encode(".jpg" if kind == "truncated-jpeg" else ".png", image)
        cut = draw(st.integers(3, len(whole) - 1))
        return kind, whole[:cut], FAILED, "truncated|corrupt"
    if kind == "magic-then-junk":
        magic = draw(st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"]))
        junk = draw(st.binary(min_size=0, max_size=512))
        return kind, magic + junk, FAILED, "truncated|corrupt|declares"
    if kind == "bomb-png":
        return kind, png_header_only(60_000, 60_000) + b"\x00" * 64, FAILED, "over the 40-megapixel limit"
    if kind == "bomb-jpeg":
        return kind, _jpeg_declaring(65_000, 65_000), FAILED, "over the 40-megapixel limit"
    if kind == "zero-size-png":
        return kind, png_header_only(0, height), FAILED, "declares 0x"
    if kind == "png-header-then-nothing":
        # Within the limits by its header, so it reaches the decoder, which must fail cleanly.
        return kind, png_header_only(4000, 3000) + _png_chunk(b"IEND", b""), FAILED, "corrupt or truncated"
    return kind, b"\xff\xd8\xff" + bytes(MAX_FRAME_BYTES), FAILED, "over the 8388608-byte limit"


def _not_an_image_magic(body: bytes) -> bool:
    """Neither starts with a signature nor stops inside one (``b"\\xff"`` reads as a truncated JPEG)."""
    return not any(body.startswith(magic) or magic.startswith(body) for magic in (JPEG_MAGIC, PNG_MAGIC))


@st.composite
def damaged_images(draw: st.DrawFn) -> tuple[str, bytes]:
    """A good image with a few bytes overwritten past its signature: it may still decode, or not."""
    _, body = draw(good_images())
    damaged = bytearray(body)
    for _ in range(draw(st.integers(1, 4))):
        damaged[draw(st.integers(8, len(body) - 1))] = draw(st.integers(0, 255))
    return "damaged", bytes(damaged)


# ---- properties and headers --------------------------------------------------------------------------------

names = st.from_regex(r"[A-Za-z0-9_-]{1,16}", fullmatch=True)
# Any text but NUL, which the contract refuses (Postgres cannot store it): the nul-in-text mutation sends it.
texts = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), min_size=1, max_size=32)


@st.composite
def valid_messages(draw: st.DrawFn, body: bytes, kind: str) -> FuzzMessage:
    """A message on the contract carrying ``body``: bulk, or realtime with a deadline a minute away."""
    lane = draw(st.sampled_from(["bulk", "bulk", "bulk", "realtime"]))
    site, camera = draw(names), draw(names)
    captured = datetime.now(UTC) - timedelta(milliseconds=draw(st.integers(0, 5000)))
    headers: dict[str, Any] = {
        H_SCHEMA: 1,
        H_CAMERA: camera,
        H_SITE: site,
        H_CAPTURED_AT: format_time(captured),
        H_TRACE_ID: draw(texts.filter(str.strip)),
        H_ATTEMPT: 1,
    }
    if lane == "realtime":
        headers[H_DEADLINE] = format_time(captured + timedelta(seconds=60))
    properties: dict[str, Any] = {
        "message_id": str(uuid.uuid4()),
        "timestamp": int(captured.timestamp()),
        "app_id": "fuzz-gateway",
        "headers": headers,
    }
    # A realtime frame may wait past the lane's TTL behind a quarantine sweep: then it is shed, not lost.
    expected = OK if lane == "bulk" else OK_OR_SHED
    return FuzzMessage(kind, f"{lane}.{site}.{camera}", body, properties, expected)


def _small_jpeg(seed: int) -> bytes:
    return _encode(".jpg", _noise(24, 16, 3, seed))


def _with_headers(message: FuzzMessage, **headers: Any) -> dict[str, Any]:
    return {**message.properties, "headers": {**message.properties["headers"], **headers}}


def _without_header(message: FuzzMessage, name: str) -> dict[str, Any]:
    kept = {k: v for k, v in message.properties["headers"].items() if k != name}
    return {**message.properties, "headers": kept}


def _bad(
    message: FuzzMessage, kind: str, properties: dict[str, Any], reason: str, **changes: Any
) -> FuzzMessage:
    return replace(message, kind=kind, properties=properties, expected=FAILED, reason=reason, **changes)


TEXT_HEADERS = (H_CAMERA, H_SITE, H_CAPTURED_AT, H_TRACE_ID)
WRONG_TYPES = st.sampled_from(
    [
        (42, "must be text, got int"),
        (True, "must be text, got bool"),
        (Decimal("1.5"), "must be text, got Decimal"),
        ([1, "a"], "must be text, got list"),
        ({"nested": 1}, "must be text, got dict"),
        (datetime(2026, 1, 1, tzinfo=UTC), "must be text, got datetime"),
        (None, "is missing"),
        (b"\xff\xfe", "is not UTF-8 text"),
    ]
)


@st.composite
def mutated_messages(draw: st.DrawFn, mutation: str) -> FuzzMessage:
    """A valid message with one thing off the contract in its properties, headers or routing key."""
    good = draw(valid_messages(_small_jpeg(draw(seeds)), "mutated"))
    return _MUTATIONS[mutation](draw, good, good.properties["headers"])


def _no_message_id(draw: st.DrawFn, m: FuzzMessage, h: dict[str, Any]) -> FuzzMessage:
    props = {k: v for k, v in m.properties.items() if k != "message_id"}
    return _bad(m, "no-message-id", props, "message_id property is missing")


def _message_id_not_uuid(draw: st.DrawFn, m: FuzzMessage, h: dict[str, Any]) -> FuzzMessage:
    props = {**m.properties, "message_id": "frame-" + draw(texts)}
    return _bad(m, "message-id-not-uuid", props, "task_id")


def _undecodable_property(draw: st.DrawFn, m: FuzzMessage, h: dict[str, Any]) -> FuzzMessage:
    name = draw(st.sampled_from(["message_id", "app_id", "content_type"]))
    props = {**m.properties, name: draw(NOT_UTF8)}
    return _bad(m, f"{name}-not-utf8", props, f"{name} property is not UTF-8 text", undecodable=True)


def _undecodable_header_name(draw: st.DrawFn, m: FuzzMessage, h: dict[str, Any]) -> FuzzMessage:
    headers: dict[str | bytes, Any] = {key: value for key, value in h.items()}  # keys may be bytes
    headers[draw(NOT_UTF8)] = "x"
    props = {**m.properties, "headers": headers}
    return _bad(m, "header-name-not-utf8", props, "header '.*' is not UTF-8 text", undecodable=True)


def _timestamp_out_of_range(draw: st.DrawFn, m: FuzzMessage, h: dict[str, Any]) -> FuzzMessage:
    # pamqp reads a timestamp over 2**32 as milliseconds: only past the year 9999 in those does it fail.
    props = {**m.properties, "timestamp": draw(st.integers(253_402_300_800_000, 2**64 - 1))}
    return _bad(m, "timestamp-out-of-range", props, "timestamp property is out of range", undecodable=True)


def _odd_but_valid_properties(draw: st.DrawFn, m: FuzzMessage, h: dict[str, Any]) -> FuzzMessage:
    """What the contract tolerates: no app_id or timestamp, a lying content_type, extra headers."""
    props = {k: v for k, v in m.properties.items() if k not in ("app_id", "timestamp")}
    if draw(st.booleans()):
        props["app_id"] = draw(texts)
    timestamp = draw(
        st.sampled_from([None, 0, 2**32 - 1, 2**32, 253_402_300_799_999, m.properties["timestamp"]])
    )
    if timestamp is not None:
        props["timestamp"] = timestamp
    props["content_type"] = draw(st.sampled_from(["image/gif", "application/octet-stream", "text/plain"]))
    props["headers"] = {**h, "x-extra": draw(st.sampled_from(["a" * 50_000, [1, 2, 3], {"k": b"v"}]))}
    return replace(m, kind="odd-valid-properties", properties=props)


def _missing_header(draw: st.DrawFn, m: FuzzMessage, h: dict[str, Any]) -> FuzzMessage:
    name = draw(st.sampled_from([H_SCHEMA, *TEXT_HEADERS]))
    return _bad(m, "missing-header", _without_header(m, name), f"{name} is missing")


def _wrong_type(draw: st.DrawFn, m: FuzzMessage, h: dict[str, Any]) -> FuzzMessage:
    name = draw(st.sampled_from(TEXT_HEADERS))
    value, reason = draw(WRONG_TYPES)
    return _bad(m, "header-wrong-type", _with_headers(m, **{name: value}), f"header {name} {reason}")


def _bad_schema(draw: st.DrawFn, m: FuzzMessage, h: dict[str, Any]) -> FuzzMessage:
    value, reason = draw(
        st.sampled_from(
            [
                ("1", "must be an integer"),
                (True, "must be an integer"),
                (2, "unsupported schema 2"),
                (7, "unsupported schema 7"),
                (0, "unknown schema version 0"),
                (-3, "unknown schema version -3"),
            ]
        )
    )
    return _bad(m, "bad-schema", _with_headers(m, **{H_SCHEMA: value}), reason)


def _bad_attempt(draw: st.DrawFn, m: FuzzMessage, h: dict[str, Any]) -> FuzzMessage:
    value, reason = draw(
        st.sampled_from([("2", "must be an integer"), (0, "attempt"), (-1, "attempt"), (10**6, "attempt")])
    )
    return _bad(m, "bad-attempt", _with_headers(m, **{H_ATTEMPT: value}), reason)


def _bad_time(draw: st.DrawFn, m: FuzzMessage, h: dict[str, Any]) -> FuzzMessage:
    name = draw(st.sampled_from([H_CAPTURED_AT, H_DEADLINE]))
    text = draw(
        st.sampled_from(["yesterday", "2026-01-01T00:00:00", "2026-13-01T00:00:00Z", "1767225600", " "])
    )
    reason = f"{name}.*(RFC 3339|missing)"
    return _bad(m, "bad-time-header", _with_headers(m, **{name: text}), reason)


def _past_deadline(draw: st.DrawFn, m: FuzzMessage, h: dict[str, Any]) -> FuzzMessage:
    deadline = format_time(datetime.now(UTC) - timedelta(seconds=draw(st.integers(1, 10**6))))
    props = _with_headers(m, **{H_DEADLINE: deadline})
    if m.routing_key.startswith("realtime."):
        return replace(m, kind="past-deadline-realtime", properties=props, expected=SHED)
    return _bad(m, "past-deadline-bulk", props, "deadline exceeded")


def _huge_header(draw: st.DrawFn, m: FuzzMessage, h: dict[str, Any]) -> FuzzMessage:
    name = draw(st.sampled_from([H_CAMERA, H_TRACE_ID]))
    size = draw(st.integers(200, 60_000))
    return _bad(m, "huge-header", _with_headers(m, **{name: "x" * size}), name)


def _routing_disagrees(draw: st.DrawFn, m: FuzzMessage, h: dict[str, Any]) -> FuzzMessage:
    other = draw(names.filter(lambda n: n != h[H_SITE]))
    return _bad(m, "routing-disagrees", _with_headers(m, **{H_SITE: other}), "disagree with routing key")


def _routing_malformed(draw: st.DrawFn, m: FuzzMessage, h: dict[str, Any]) -> FuzzMessage:
    lane = m.routing_key.split(".")[0]
    key = draw(st.sampled_from([f"{lane}.{h[H_SITE]}", f"{lane}.{h[H_SITE]}.{h[H_CAMERA]}.extra"]))
    return _bad(m, "routing-malformed", m.properties, "routing key must be", routing_key=key)


def _non_ascii_names(draw: st.DrawFn, m: FuzzMessage, h: dict[str, Any]) -> FuzzMessage:
    camera = draw(st.sampled_from(["kamera-ü", "камера", "cam 1", "cam*"]))
    props = _with_headers(m, **{H_CAMERA: camera})
    key = f"{m.routing_key.rsplit('.', 1)[0]}.{camera}"
    return _bad(m, "non-ascii-name", props, "camera_id", routing_key=key)


def _nul_in_text(draw: st.DrawFn, m: FuzzMessage, h: dict[str, Any]) -> FuzzMessage:
    trace = draw(texts) + "\x00" + draw(texts)
    return _bad(m, "nul-in-text", _with_headers(m, **{H_TRACE_ID: trace}), "trace_id: .*must not contain NUL")


def _no_headers(draw: st.DrawFn, m: FuzzMessage, h: dict[str, Any]) -> FuzzMessage:
    props = {k: v for k, v in m.properties.items() if k != "headers"}
    return _bad(m, "no-headers", props, f"{H_SCHEMA} is missing", headers_absent=True)


_MUTATIONS = {
    "no-message-id": _no_message_id,
    "message-id-not-uuid": _message_id_not_uuid,
    "undecodable-property": _undecodable_property,
    "undecodable-header-name": _undecodable_header_name,
    "timestamp-out-of-range": _timestamp_out_of_range,
    "odd-valid-properties": _odd_but_valid_properties,
    "missing-header": _missing_header,
    "wrong-type": _wrong_type,
    "bad-schema": _bad_schema,
    "bad-attempt": _bad_attempt,
    "bad-time": _bad_time,
    "past-deadline": _past_deadline,
    "huge-header": _huge_header,
    "routing-disagrees": _routing_disagrees,
    "routing-malformed": _routing_malformed,
    "non-ascii-names": _non_ascii_names,
    "no-headers": _no_headers,
    "nul-in-text": _nul_in_text,
}


# ---- messages ----------------------------------------------------------------------------------------------


@st.composite
def good_messages(draw: st.DrawFn, kind: str) -> FuzzMessage:
    kind, body = draw(good_images(kind))
    return draw(valid_messages(body, kind))


@st.composite
def bad_body_messages(draw: st.DrawFn, kind: str) -> FuzzMessage:
    kind, body, expected, reason = draw(bad_bodies(kind))
    message = draw(valid_messages(body, kind))
    return replace(message, expected=expected | _shed_if_realtime(message), reason=reason)


@st.composite
def damaged_messages(draw: st.DrawFn, _: str) -> FuzzMessage:
    kind, body = draw(damaged_images())
    message = draw(valid_messages(body, kind))
    # Damage inside the compressed data may still decode (JPEG has no checksum): either way, one row.
    return replace(message, expected=message.expected | OK_OR_FAILED, reason="corrupt|truncated|declares")


def _shed_if_realtime(message: FuzzMessage) -> frozenset[str]:
    """A valid realtime task waiting past the lane's TTL (behind a quarantine sweep) is shed by the intake
    before its body is looked at: that is the contract too."""
    return SHED if message.routing_key.startswith("realtime.") else frozenset()


_FAMILIES: dict[str, Callable[[str], st.SearchStrategy[FuzzMessage]]] = {
    "good": good_messages,
    "bad-body": bad_body_messages,
    "mutated": mutated_messages,
    "damaged": damaged_messages,
}
# Every kind once per cycle, good frames twice: a batch walks the cycle from a drawn offset, so a few
# hundred inputs cover every kind several times however Hypothesis biases its choices.
KINDS: tuple[tuple[str, str], ...] = (
    *(("good", kind) for kind in GOOD_IMAGE_KINDS * 2),
    *(("bad-body", kind) for kind in BAD_BODY_KINDS),
    *(("mutated", kind) for kind in _MUTATIONS),
    ("damaged", "damaged"),
    ("damaged", "damaged"),
)


def message_of(family: str, kind: str) -> st.SearchStrategy[FuzzMessage]:
    return _FAMILIES[family](kind)


@st.composite
def batches(draw: st.DrawFn, size: int) -> list[FuzzMessage]:
    """``size`` messages of consecutive kinds from a drawn place in :data:`KINDS`, in a drawn order."""
    offset = draw(st.integers(0, len(KINDS) - 1))
    chosen = [KINDS[(offset + i) % len(KINDS)] for i in range(size)]
    batch = [draw(message_of(family, kind)) for family, kind in chosen]
    return list(draw(st.permutations(batch)))


__all__ = ["CASE_HEADER", "KINDS", "FuzzMessage", "batches", "message_of"]
