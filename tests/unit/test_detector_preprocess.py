"""Preprocessing: any decoded image to 8-bit BGR, the letterbox and its inverse, the NCHW blob."""

from __future__ import annotations

from dataclasses import astuple

import cv2
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.detector.preprocess import PAD_VALUE, InputBuffer, Letterbox, letterbox, to_bgr8, to_blob


def test_grey_images_become_three_equal_channels() -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for image in (grey, grey[:, :, None]):
        bgr = to_bgr8(image)
        assert bgr.shape == (3, 4, 3)
        assert bgr.dtype == np.uint8
        assert (bgr == grey[:, :, None]).all()


def test_alpha_is_dropped_and_colour_order_kept() -> None:
    bgra = np.zeros((2, 2, 4), np.uint8)
    bgra[...] = (10, 20, 30, 0)  # fully transparent: the colour still counts, the alpha does not
    assert to_bgr8(bgra)[0, 0].tolist() == [10, 20, 30]


def test_16_bit_images_are_scaled_to_the_full_8_bit_range() -> None:
    deep = np.array([[0, 257, 1000, 40000, 65535]], np.uint16)
    assert to_bgr8(deep)[0, :, 0].tolist() == [0, 1, 4, 156, 255]
    assert to_bgr8(np.dstack([deep] * 4)).shape == (1, 5, 3)


def test_8_bit_bgr_passes_through_untouched() -> None:
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert to_bgr8(image) is image


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (np.zeros((4, 4, 2), np.uint8), "channels"),
        (np.zeros((4, 4, 3), np.float32), "uint8 or uint16"),
        (np.zeros((2, 4, 4, 3), np.uint8), "dimensions"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
    ],
)
def test_other_layouts_are_refused_with_a_reason(image: np.ndarray, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        to_bgr8(image)


@pytest.mark.parametrize(
    ("source", "canvas", "expected"),
    [
        ((640, 640), (640, 640), Letterbox(1.0, 1.0, 0, 0, 640, 640)),
        ((1280, 720), (640, 640), Letterbox(0.5, 0.5, 0, 140, 1280, 720)),
        ((300, 600), (640, 640), Letterbox(640 / 600, 640 / 600, 160, 0, 300, 600)),
        ((100, 100), (320, 256), Letterbox(2.56, 2.56, 32, 0, 100, 100)),
    ],
)
def test_the_letterbox_fits_and_centres(
    source: tuple[int, int], canvas: tuple[int, int], expected: Letterbox
) -> None:
    assert astuple(Letterbox.fit(source, canvas)) == pytest.approx(astuple(expected))


def test_the_canvas_is_padded_grey_around_the_resized_image() -> None:
    canvas, placement = letterbox(np.zeros((360, 640, 3), np.uint8), (640, 640))
    assert canvas.shape == (640, 640, 3)
    assert placement.pad_top == 140
    assert (canvas[:140] == PAD_VALUE).all()
    assert (canvas[500:] == PAD_VALUE).all()
    assert (canvas[140:500] == 0).all()


sizes = st.integers(min_value=8, max_value=2000)


@given(width=sizes, height=sizes, canvas_w=st.sampled_from([320, 640]), canvas_h=st.sampled_from([256, 640]))
def test_boxes_survive_the_round_trip_through_the_canvas(
    width: int, height: int, canvas_w: int, canvas_h: int
) -> None:
    placement = Letterbox.fit((width, height), (canvas_w, canvas_h))
    box = np.array([[width * 0.1, height * 0.2, width * 0.7, height * 0.9]])
    assert placement.to_source(placement.to_canvas(box)) == pytest.approx(box, abs=0.5)


@pytest.mark.parametrize(("width", "height"), [(640, 480), (480, 640), (1000, 300), (123, 457), (640, 640)])
def test_the_forward_mapping_matches_where_the_pixels_really_land(width: int, height: int) -> None:
    image = np.zeros((height, width, 3), np.uint8)
    x1, y1, x2, y2 = width // 4, height // 3, width // 2, height * 3 // 4
    image[y1:y2, x1:x2] = 255
    canvas, placement = letterbox(image, (640, 640))
    ys, xs = np.nonzero(canvas[:, :, 0] > 127)  # half-intensity edge: where interpolation crosses the middle
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float64)
    assert placement.to_canvas(np.array([[x1, y1, x2, y2]], np.float64)) == pytest.approx(found, abs=1.5)


def test_boxes_are_clipped_to_the_source_image() -> None:
    placement = Letterbox.fit((1280, 720), (640, 640))
    inside_padding = np.array([[-20.0, 100.0, 700.0, 600.0]])
    assert placement.to_source(inside_padding).tolist() == [[0.0, 0.0, 1280.0, 720.0]]


def test_the_blob_is_nchw_rgb_in_unit_range_for_mixed_sizes() -> None:
    blue = np.zeros((100, 200, 3), np.uint8)
    blue[...] = (255, 0, 0)
    grey = np.full((50, 40), 51, np.uint8)
    blob, placements = to_blob([blue, grey], (64, 64))
    assert blob.shape == (2, 3, 64, 64)
    assert blob.dtype == np.float32
    assert blob[0, :, 32, 32].tolist() == pytest.approx([0.0, 0.0, 1.0])  # BGR blue is RGB channel 2
    assert blob[1, :, 32, 32].tolist() == pytest.approx([0.2] * 3)
    assert blob[0, :, 0, 0].tolist() == pytest.approx([PAD_VALUE / 255] * 3)
    assert [p.source_width for p in placements] == [200, 40]


def test_the_letterbox_interpolates_like_cv2_resize() -> None:
    image = np.random.default_rng(1).integers(0, 256, (64, 32, 3), dtype=np.uint8)
    canvas, _ = letterbox(image, (32, 32))
    assert (canvas[:, 8:24] == cv2.resize(image, (16, 32), interpolation=cv2.INTER_LINEAR)).all()


def test_a_reused_buffer_leaves_nothing_of_the_previous_batch() -> None:
    buffer = InputBuffer((32, 32))
    buffer.fill([np.full((32, 32, 3), 255, np.uint8)] * 3)
    tensor, placements = buffer.fill([np.zeros((16, 32, 3), np.uint8)], rows=2)
    assert tensor.shape == (2, 3, 32, 32)
    assert len(placements) == 1
    assert (tensor[0, :, 8:24] == 0).all()
    assert np.allclose(tensor[0, :, :8], PAD_VALUE / 255)
    assert np.allclose(tensor[1], PAD_VALUE / 255)  # the padding rows of a fixed-batch chunk


def test_the_buffer_matches_the_canvas_letterbox() -> None:
    image = np.random.default_rng(2).integers(0, 256, (90, 170, 3), dtype=np.uint8)
    canvas, _ = letterbox(image, (64, 48))
    tensor, _ = to_blob([image], (64, 48))
    assert tensor[0] == pytest.approx(canvas[:, :, ::-1].transpose(2, 0, 1) / 255, abs=1e-6)
