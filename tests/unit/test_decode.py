"""The decode seam: the reduction chosen from the header, every layout to 8-bit BGR, boxes back in source
pixels at every reduction, and the same reasons as before for what cannot be decoded."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.decode import decode_at, decode_frame, reduction_for
from consumer.detector import DecodedFrame, DetectorConfig, load_detector
from shared.frames import inspect_frame
from tests.support.fuzz import BAD_BODY_KINDS, CMYK_JPEG, GOOD_IMAGE_KINDS, bad_bodies, good_images
from tests.support.onnx_graphs import write_bright_square_model

SHIPPED_INPUT = (320, 320)
# Odd, portrait, 16:9 and sizes not divisible by 8, so libjpeg's rounded-up reduced sizes are exercised.
SIZES = [(640, 480), (333, 250), (375, 500), (1280, 720), (329, 241)]
EXAMPLES = settings(
    max_examples=60,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def jpeg(image: np.ndarray, quality: int = 100) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def decoded(body: bytes, input_size: tuple[int, int]) -> DecodedFrame:
    frame = decode_frame(body, input_size)
    assert isinstance(frame, DecodedFrame), frame
    return frame


# ---- which scale -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "input_size", "reduction"),
    [
        ((640, 480), (320, 320), 2),  # fits to 320x240: half scale covers it exactly
        ((1280, 720), (320, 320), 4),
        ((2560, 1920), (320, 320), 8),
        ((1280, 720), (640, 640), 2),
        ((640, 480), (640, 640), 1),  # the model's input is as large as the frame
        ((333, 250), (320, 320), 1),  # 167x125 at half scale would be resized up: no reduction
        ((200, 100), (320, 320), 1),  # smaller than the model: the letterbox enlarges it
        ((329, 241), (42, 42), 8),  # ceil(329 / 8) = 42 columns cover the 42-wide fit
    ],
)
def test_the_smallest_scale_that_still_covers_the_letterboxed_input_is_chosen(
    source: tuple[int, int], input_size: tuple[int, int], reduction: int
) -> None:
    body = jpeg(np.zeros((source[1], source[0], 3), np.uint8), 90)
    assert reduction_for(inspect_frame(body), input_size) == reduction
    frame = decoded(body, input_size)
    assert (frame.reduction, frame.source_size) == (reduction, source)
    width, height = source
    assert frame.pixels.shape == (-(-height // reduction), -(-width // reduction), 3)  # libjpeg rounds up


def test_png_is_decoded_at_full_scale() -> None:
    frame = decoded(png(np.zeros((480, 640, 3), np.uint8)), SHIPPED_INPUT)
    assert (frame.reduction, frame.pixels.shape) == (1, (480, 640, 3))


def test_exif_orientation_is_ignored_at_every_scale_as_at_full_scale() -> None:
    """A reduced decode would apply EXIF orientation where the full-scale one does not: a rotated frame
    would no longer match its header's size nor the pixels the model saw before."""
    image = np.zeros((480, 640, 3), np.uint8)
    image[:, :100] = 255  # a white band on the left
    body = _with_exif_orientation(jpeg(image), 6)  # 6: rotate 90 degrees clockwise to display
    full, reduced = decoded(body, (640, 640)), decoded(body, SHIPPED_INPUT)
    assert (full.reduction, reduced.reduction) == (1, 2)
    assert full.pixels.shape == (480, 640, 3)
    assert reduced.pixels.shape == (240, 320, 3)
    assert reduced.pixels[:, :40].min() > 200  # still on the left: not rotated


def _with_exif_orientation(body: bytes, orientation: int) -> bytes:
    """The JPEG with an APP1 Exif segment holding one Orientation tag, right after SOI."""
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1)
    tiff += struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + tiff
    return body[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + body[2:]


# ---- layouts and reasons ----------------------------------------------------------------------------------


@EXAMPLES
@given(good_images(), st.sampled_from([(640, 640), (8, 8), (2, 2)]))
def test_every_accepted_layout_decodes_to_8_bit_bgr_at_its_header_size(
    image: tuple[str, bytes], input_size: tuple[int, int]
) -> None:
    kind, body = image
    header = inspect_frame(body)
    frame = decoded(body, input_size)
    assert frame.pixels.dtype == np.uint8
    assert frame.pixels.ndim == 3, kind
    assert frame.pixels.shape[2] == 3, kind
    assert frame.source_size == (header.width, header.height)
    assert frame.reduction == reduction_for(header, input_size)
    assert frame.reduction == 1 or kind.startswith("jpeg"), kind


@pytest.mark.parametrize("kind", GOOD_IMAGE_KINDS)
def test_each_layout_is_covered(kind: str) -> None:
    """Each kind once at a small input size, so the reduced path sees grey, progressive and CMYK JPEGs."""

    @EXAMPLES
    @given(good_images(kind))
    def example(image: tuple[str, bytes]) -> None:
        frame = decoded(image[1], (4, 4))
        assert frame.pixels.dtype == np.uint8
        assert frame.pixels.shape[2] == 3

    example()


def test_a_cmyk_jpeg_keeps_its_colours_when_reduced() -> None:
    full, reduced = decoded(CMYK_JPEG, (16, 16)), decoded(CMYK_JPEG, (4, 4))
    assert (full.reduction, reduced.reduction) == (1, 4)
    full_mean = full.pixels.reshape(-1, 3).mean(axis=0)
    reduced_mean = reduced.pixels.reshape(-1, 3).mean(axis=0)
    assert np.abs(full_mean - reduced_mean).max() < 8


@pytest.mark.parametrize("kind", BAD_BODY_KINDS)
def test_what_cannot_be_decoded_gets_a_readable_reason(kind: str) -> None:
    @settings(max_examples=10, derandomize=True, database=None, deadline=None)
    @given(bad_bodies(kind))
    def example(bad: tuple[str, bytes, frozenset[str], str]) -> None:
        _, body, _, reason = bad
        result = decode_frame(body, SHIPPED_INPUT)
        assert isinstance(result, str)
        assert re.search(reason, result), (result, reason)

    example()


def test_an_undecodable_body_behind_a_good_header_gets_the_reason_of_before() -> None:
    body = jpeg(np.zeros((480, 640, 3), np.uint8), 90)
    broken = body[:400]  # header intact, scan cut short: libjpeg still returns what it has
    header_only = body[: body.index(b"\xff\xda")]  # no scan at all
    assert (
        decode_frame(header_only, SHIPPED_INPUT) == "corrupt or truncated image: OpenCV could not decode it"
    )
    assert isinstance(decode_frame(broken, SHIPPED_INPUT), DecodedFrame | str)  # never raises


def test_a_decoded_frame_must_match_its_source_and_reduction() -> None:
    with pytest.raises(ValueError, match="not a 333x250 frame at 1/8"):
        DecodedFrame(np.zeros((31, 42, 3), np.uint8), (333, 250), 8)  # 250 / 8 rounds up to 32 rows
    with pytest.raises(ValueError, match="reduction"):
        DecodedFrame(np.zeros((10, 10, 3), np.uint8), (30, 30), 3)
    assert DecodedFrame.of(np.zeros((5, 7), np.uint8)).source_size == (7, 5)


# ---- boxes back in source pixels -----------------------------------------------------------------------


def _rectangle(width: int, height: int, to_the_edge: bool) -> tuple[int, int, int, int]:
    """A rectangle with block-aligned left and top edges; to_the_edge: it runs to the right and bottom
    edges, where the last reduced pixel covers a partial block."""
    x1, y1 = width * 3 // 10 // 8 * 8, height * 4 // 10 // 8 * 8
    if to_the_edge:
        return x1, y1, width, height
    return x1, y1, width * 7 // 10 // 8 * 8, height * 8 // 10 // 8 * 8


@pytest.mark.parametrize("to_the_edge", [False, True], ids=["inside", "to-the-edge"])
@pytest.mark.parametrize("reduction", [1, 2, 4, 8])
@pytest.mark.parametrize("source", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_a_drawn_box_comes_back_in_source_pixels_at_every_reduction(
    tmp_path: Path, source: tuple[int, int], reduction: int, to_the_edge: bool
) -> None:
    width, height = source
    # A square canvas exactly as large as the reduced frame's longer side: decode_frame picks this reduction
    # and the letterbox does not resize, so the box the model sees is the reduced decode's own.
    side = max(-(-width // reduction), -(-height // reduction))
    model = write_bright_square_model(tmp_path / "m.onnx", input_size=(side, side))
    detector = load_detector(DetectorConfig(model_path=model, device="cpu"))
    box = _rectangle(width, height, to_the_edge)
    image = np.zeros((height, width, 3), np.uint8)
    image[box[1] : box[3], box[0] : box[2]] = 255

    frame = decoded(jpeg(image), detector.info.input_size)
    [[detection]] = detector.detect([frame])

    assert frame.reduction == reduction
    assert detection.box == pytest.approx(box, abs=2.0)


def test_the_fake_detector_answers_in_source_pixels_for_a_reduced_frame() -> None:
    from consumer.detector.fake import FakeDetector

    frame = decoded(jpeg(np.zeros((720, 1280, 3), np.uint8), 90), (640, 640))
    assert frame.reduction == 2
    [[detection]] = FakeDetector().detect([frame])
    assert detection.box == (0.0, 0.0, 640.0, 360.0)  # the centre of 1280x720, not of the 640x360 pixels


def test_decode_at_full_scale_is_what_the_consumer_did_before() -> None:
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)
    body = jpeg(image, 90)
    frame = decode_at(body, inspect_frame(body), 1)
    assert isinstance(frame, DecodedFrame)
    before = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
    assert before is not None
    assert np.array_equal(frame.pixels, before)
