"""Images to the model's input tensor: 8-bit BGR, centred letterbox, NCHW float32 RGB in [0, 1]."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

PAD_VALUE = 114  # the grey ultralytics pads with; models trained with it expect it
_UINT16_TO_UINT8 = 1 / 257  # maps 0..65535 onto 0..255 exactly at both ends
_UNIT_SCALE = np.float32(1 / 255)  # a float32 scalar keeps the multiply in float32


def to_bgr8(image: np.ndarray) -> np.ndarray:
    """A decoded image (grey, BGR or BGRA; 8 or 16 bit) as 8-bit BGR. Raises ValueError for anything else."""
    image = _to_uint8(image)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim != 3:
        raise ValueError(f"expected 2 or 3 dimensions, got shape {image.shape}")
    channels = image.shape[2]
    if channels == 3:
        return image
    if channels == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    raise ValueError(f"expected 1, 3 or 4 channels, got {channels}")


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.size == 0:
        raise ValueError(f"empty image of shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return cv2.convertScaleAbs(image, alpha=_UINT16_TO_UINT8)
    raise ValueError(f"expected uint8 or uint16 pixels, got {image.dtype}")


@dataclass(frozen=True)
class Letterbox:
    """How one source image was placed on the model canvas, so boxes can be mapped both ways."""

    scale_x: float
    scale_y: float
    pad_left: int
    pad_top: int
    source_width: int
    source_height: int

    @classmethod
    def fit(cls, source_size: tuple[int, int], canvas_size: tuple[int, int]) -> Letterbox:
        """Scale to fit (keeping the aspect ratio), then centre; both sizes are (width, height)."""
        (width, height), (canvas_w, canvas_h) = source_size, canvas_size
        ratio = min(canvas_w / width, canvas_h / height)
        resized_w, resized_h = max(1, round(width * ratio)), max(1, round(height * ratio))
        # The resized size is rounded, so the true scale differs a little per axis: keep both exactly.
        return cls(
            scale_x=resized_w / width,
            scale_y=resized_h / height,
            pad_left=(canvas_w - resized_w) // 2,
            pad_top=(canvas_h - resized_h) // 2,
            source_width=width,
            source_height=height,
        )

    @property
    def resized_size(self) -> tuple[int, int]:
        return round(self.source_width * self.scale_x), round(self.source_height * self.scale_y)

    def to_canvas(self, boxes: np.ndarray) -> np.ndarray:
        """Source-pixel boxes [N, 4] (x1, y1, x2, y2) to canvas pixels."""
        mapped: np.ndarray = boxes * self._scale() + self._offset()
        return mapped

    def to_source(self, boxes: np.ndarray) -> np.ndarray:
        """Canvas-pixel boxes [N, 4] (x1, y1, x2, y2) to source pixels, clipped to the source image."""
        mapped = (boxes - self._offset()) / self._scale()
        limits = np.array([self.source_width, self.source_height] * 2, dtype=mapped.dtype)
        clipped: np.ndarray = np.clip(mapped, 0, limits)
        return clipped

    def _scale(self) -> np.ndarray:
        return np.array([self.scale_x, self.scale_y] * 2, dtype=np.float32)

    def _offset(self) -> np.ndarray:
        return np.array([self.pad_left, self.pad_top] * 2, dtype=np.float32)


def letterbox(image_bgr: np.ndarray, canvas_size: tuple[int, int]) -> tuple[np.ndarray, Letterbox]:
    """The image resized into a canvas of canvas_size (width, height), centred, padded with grey."""
    resized, placement = _resized(image_bgr, canvas_size)
    canvas_w, canvas_h = canvas_size
    canvas = cv2.copyMakeBorder(
        resized,
        top=placement.pad_top,
        bottom=canvas_h - resized.shape[0] - placement.pad_top,
        left=placement.pad_left,
        right=canvas_w - resized.shape[1] - placement.pad_left,
        borderType=cv2.BORDER_CONSTANT,
        value=(PAD_VALUE, PAD_VALUE, PAD_VALUE),
    )
    return canvas, placement


def _resized(image_bgr: np.ndarray, canvas_size: tuple[int, int]) -> tuple[np.ndarray, Letterbox]:
    height, width = image_bgr.shape[:2]
    placement = Letterbox.fit((width, height), canvas_size)
    if placement.resized_size != (width, height):
        image_bgr = cv2.resize(image_bgr, placement.resized_size, interpolation=cv2.INTER_LINEAR)
    return image_bgr, placement


class InputBuffer:
    """The model input, NCHW float32 RGB in [0, 1], kept between batches: a fresh 640x640 batch of 32 is
    150 MB, and paging in a new one every batch cost more than the letterbox itself. Not thread-safe; each
    fill() overwrites the tensor the previous one returned."""

    def __init__(self, canvas_size: tuple[int, int]) -> None:
        self.canvas_size = canvas_size
        width, height = canvas_size
        self._tensor = np.empty((0, 3, height, width), np.float32)

    def fill(
        self, images: Sequence[np.ndarray], rows: int | None = None
    ) -> tuple[np.ndarray, list[Letterbox]]:
        """The letterboxed images as the first rows of the tensor; rows past the images (a fixed-batch model's
        last chunk) are plain grey. Any decoded layout is accepted, as by to_bgr8."""
        rows = max(rows or 0, len(images))
        tensor = self._rows(rows)
        tensor.fill(PAD_VALUE / 255)
        placements = [self._place(to_bgr8(image), tensor[index]) for index, image in enumerate(images)]
        return tensor, placements

    def _rows(self, rows: int) -> np.ndarray:
        if len(self._tensor) < rows:
            self._tensor = np.empty((rows, *self._tensor.shape[1:]), np.float32)
        return self._tensor[:rows]

    def _place(self, image_bgr: np.ndarray, target: np.ndarray) -> Letterbox:
        resized, placement = _resized(image_bgr, self.canvas_size)
        height, width = resized.shape[:2]
        window = target[
            :, placement.pad_top : placement.pad_top + height, placement.pad_left : placement.pad_left + width
        ]
        for channel, plane in enumerate(reversed(cv2.split(resized))):  # BGR planes, written as RGB
            np.multiply(plane, _UNIT_SCALE, out=window[channel])
        return placement


def to_blob(images: Sequence[np.ndarray], canvas_size: tuple[int, int]) -> tuple[np.ndarray, list[Letterbox]]:
    """Decoded images (any sizes) as a new NCHW float32 RGB tensor in [0, 1], and their placements."""
    return InputBuffer(canvas_size).fill(images)
