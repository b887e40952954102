"""Procedural frames of a production line with exact ground truth, deterministic from a seed.

A conveyor belt (rubber, mesh or slats, with seams and sometimes side rails) carries metal parts, empty
pockets of the carrier (a missing part), scratches on parts and coloured debris. The camera adds a mild
perspective, a scale change, uneven lighting, exposure, blur and sensor noise. Boxes are computed from the
drawn outlines after the warp, so they are exact. A frame takes a few milliseconds, so training renders on
the fly. Portrait frames are rendered as landscape and transposed: the belt always runs along the long side.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

CLASS_NAMES: tuple[str, ...] = ("part", "missing_part", "scratch", "foreign_object")
PART, MISSING_PART, SCRATCH, FOREIGN_OBJECT = range(len(CLASS_NAMES))

MAX_OBJECTS = 8
REFERENCE_SIDE = 480  # object sizes below are in pixels of a frame whose short side is this long
PERSPECTIVE_JITTER = 0.03  # of the frame size, per corner
EDGE_MARGIN = 0.05  # of the frame size: objects stay clear of the edges the warp could push them past
NOISE_TILE = (800, 1400)  # rows, columns: a 1280 x 720 frame fits with room to move
SCRATCH_CHANCE = 0.75  # of a plate or flange carrying a scratch
PLACEMENT_TRIES = 40
POCKET_YELLOW = (0, 200, 235)  # BGR of the painted pocket outlines
DEBRIS_HUES = ((0, 16), (40, 179))  # OpenCV hues, leaving out the yellow of the pocket paint

Points = np.ndarray  # [N, 2] float64 x, y in pixels of the frame being drawn
Rng = np.random.Generator
Inside = Callable[[Points, float], bool]  # whether points (part-local) lie on the part, margin kept


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in source-image pixels; score is 1.0 for ground truth."""

    label: int  # index into CLASS_NAMES
    x1: float
    y1: float
    x2: float
    y2: float
    score: float = 1.0


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # BGR uint8, shape (height, width, 3)
    boxes: tuple[Box, ...]


@dataclass(frozen=True)
class _Shape:
    """One labelled object: the outline its box is computed from, after any warp."""

    label: int
    outline: Points


@dataclass(frozen=True)
class _Slot:
    """Where an object may go: its centre and the radius it keeps free around it."""

    x: float
    y: float
    radius: float


# ---- the scene ---------------------------------------------------------------------------------------------


def render_scene(seed: int, size: tuple[int, int] = (640, 480)) -> Scene:
    """One frame of size (width, height) and its ground-truth boxes; the same seed gives the same frame."""
    width, height = size
    if width < 32 or height < 32:
        raise ValueError(f"frame size {size} is too small: both sides must be at least 32 pixels")
    rng = np.random.default_rng(seed)
    portrait = height > width
    long_side, short_side = (height, width) if portrait else (width, height)
    image, shapes = _draw_line(rng, long_side, short_side)
    image, shapes = _camera(rng, image, shapes)
    boxes = tuple(_box_of(shape, long_side, short_side) for shape in shapes)
    if portrait:
        image = np.ascontiguousarray(image.transpose(1, 0, 2))
        boxes = tuple(Box(b.label, b.y1, b.x1, b.y2, b.x2) for b in boxes)
    return Scene(image, boxes)


def _box_of(shape: _Shape, width: int, height: int) -> Box:
    x1, y1 = np.clip(shape.outline.min(axis=0), 0, (width, height))
    x2, y2 = np.clip(shape.outline.max(axis=0), 0, (width, height))
    return Box(shape.label, float(x1), float(y1), float(x2), float(y2))


def _draw_line(rng: Rng, width: int, height: int) -> tuple[np.ndarray, list[_Shape]]:
    """The belt with its objects, before the camera; the belt runs along x."""
    unit = min(width, height) / REFERENCE_SIDE * rng.uniform(0.85, 1.2)  # the scale change between frames
    image, (top, bottom) = _belt(rng, width, height, unit)
    margin = EDGE_MARGIN * max(width, height)
    area = (margin, max(top, margin), width - margin, min(bottom, height - margin))
    shapes: list[_Shape] = []
    taken: list[_Slot] = []
    for _ in range(rng.integers(0, MAX_OBJECTS + 1)):
        if len(shapes) >= MAX_OBJECTS:
            break
        draw = _pick_object(rng)
        shapes.extend(draw(rng, image, unit, area, taken))
    return image, shapes[:MAX_OBJECTS]


ObjectDrawer = Callable[
    [Rng, np.ndarray, float, tuple[float, float, float, float], list[_Slot]], list[_Shape]
]


def _pick_object(rng: Rng) -> ObjectDrawer:
    drawers: tuple[ObjectDrawer, ...] = (_part, _missing_part, _foreign_object)
    return drawers[int(rng.choice(3, p=(0.5, 0.25, 0.25)))]


def _place(
    rng: Rng, radius: float, area: tuple[float, float, float, float], taken: list[_Slot]
) -> _Slot | None:
    """A free spot inside area for an object of this radius; objects may touch a little, rarely overlap."""
    left, top, right, bottom = area
    if right - left < 2 * radius or bottom - top < 2 * radius:
        return None
    for _ in range(PLACEMENT_TRIES):
        x, y = rng.uniform(left + radius, right - radius), rng.uniform(top + radius, bottom - radius)
        if all(math.hypot(x - s.x, y - s.y) >= 0.92 * (radius + s.radius) for s in taken):
            slot = _Slot(x, y, radius)
            taken.append(slot)
            return slot
    return None


# ---- the belt ----------------------------------------------------------------------------------------------


def _belt(rng: Rng, width: int, height: int, unit: float) -> tuple[np.ndarray, tuple[float, float]]:
    """A belt texture over the frame, with rails above and below it in most frames; returns its y extent."""
    base = rng.uniform(38, 88)
    grey = _smooth_noise(rng, width, height, cells=32, amplitude=rng.uniform(4, 14))
    grey += np.float32(base)
    texture = int(rng.integers(3))
    if texture == 1:
        _mesh(rng, grey, unit)
    elif texture == 2:
        _slats(rng, grey, unit)
    _seams(rng, grey, base, unit)
    tint = 1 + rng.uniform(-0.05, 0.05, 3)
    # A scalar second operand is valid OpenCV; the stubs know only arrays there.
    image = cv2.merge([cv2.multiply(grey, float(t), dtype=cv2.CV_8U) for t in tint])  # type: ignore[call-overload]
    if rng.random() < 0.3:
        return image, (0.0, float(height))
    top = rng.uniform(0.03, 0.12) * height
    bottom = height - rng.uniform(0.03, 0.12) * height
    _rails(rng, image, top, bottom, unit)
    return image, (top, bottom)


def _smooth_noise(rng: Rng, width: int, height: int, cells: int, amplitude: float) -> np.ndarray:
    """Low-frequency mottling: coarse random values upsampled smoothly."""
    coarse = rng.uniform(-amplitude, amplitude, (height // cells + 2, width // cells + 2)).astype(np.float32)
    smooth: np.ndarray = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)
    return smooth


def _mesh(rng: Rng, grey: np.ndarray, unit: float) -> None:
    period = max(3, round(rng.uniform(7, 12) * unit))
    depth = rng.uniform(8, 18)
    grey[::period, :] -= depth
    grey[:, period // 2 :: period] -= depth


def _slats(rng: Rng, grey: np.ndarray, unit: float) -> None:
    """Slats across the belt: alternating shades with a dark gap between them."""
    period = max(8, round(rng.uniform(28, 60) * unit))
    shade = rng.uniform(4, 12)
    gap = max(1, round(2 * unit))
    width = grey.shape[1]
    offset = int(rng.integers(period))
    for index, start in enumerate(range(-offset, width, period)):
        grey[:, max(start, 0) : max(start + period, 0)] += shade if index % 2 else -shade
        grey[:, max(start, 0) : max(start + gap, 0)] -= 3 * shade


def _seams(rng: Rng, grey: np.ndarray, base: float, unit: float) -> None:
    """Splices of the belt: straight lines across it, darker or lighter than the belt."""
    height, width = grey.shape
    for _ in range(rng.integers(0, 3)):
        x = rng.uniform(0, width)
        skew = rng.uniform(-0.1, 0.1) * height
        shade = base + float(rng.choice((-1, 1)) * rng.uniform(12, 28))
        thickness = max(1, round(rng.uniform(2, 4) * unit))
        cv2.line(grey, (round(x), 0), (round(x + skew), height), shade, thickness, cv2.LINE_AA)


def _rails(rng: Rng, image: np.ndarray, top: float, bottom: float, unit: float) -> None:
    """Painted steel guide rails beside the belt, with a bright chamfer along the belt edge."""
    height, width = image.shape[:2]
    paint = np.array(rng.choice(((90, 80, 60), (70, 90, 70), (95, 95, 100), (60, 70, 110))), np.float32)
    paint *= rng.uniform(0.8, 1.2)
    chamfer = max(1, round(3 * unit))
    for y1, y2, edge in ((0, round(top), round(top) - chamfer), (round(bottom), height, round(bottom))):
        image[y1:y2] = np.clip(paint, 0, 255).astype(np.uint8)
        image[max(edge, 0) : max(edge + chamfer, 0)] = np.clip(paint * 1.6, 0, 255).astype(np.uint8)
    for x in np.arange(rng.uniform(20, 60) * unit, width, rng.uniform(90, 160) * unit):  # bolts
        for y in (top / 2, (bottom + height) / 2):
            cv2.circle(image, (round(x), round(y)), max(1, round(3 * unit)), (40, 40, 40), -1, cv2.LINE_AA)


# ---- the objects -------------------------------------------------------------------------------------------


def _rotated(points: Points, angle_deg: float, centre: tuple[float, float]) -> Points:
    angle = math.radians(angle_deg)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    moved: Points = points @ rotation.T + np.asarray(centre)
    return moved


def _fill(image: np.ndarray, outline: Points, colour: tuple[float, ...]) -> None:
    cv2.fillPoly(image, [np.round(outline * 16).astype(np.int32)], colour, cv2.LINE_AA, shift=4)


def _shadow(image: np.ndarray, outline: Points, unit: float) -> None:
    """A soft drop shadow: the belt under the object's edge darkens."""
    x1, y1 = np.floor(outline.min(axis=0)).astype(int)
    x2, y2 = np.ceil(outline.max(axis=0)).astype(int) + round(6 * unit)
    x1, y1 = max(x1, 0), max(y1, 0)
    region = image[y1:y2, x1:x2]
    if region.size == 0:
        return
    footprint = np.zeros(region.shape[:2], np.uint8)
    _fill(footprint, outline + 4 * unit - (x1, y1), (255,))
    soft = cv2.GaussianBlur(footprint, (0, 0), 2 * unit + 0.5)
    region[:] = (region * (1 - soft[:, :, None] * (0.45 / 255))).astype(np.uint8)


def _metal(rng: Rng, image: np.ndarray, outline: Points) -> None:
    """Brushed metal: a bright grey with a linear sheen across the object."""
    x1, y1 = np.floor(outline.min(axis=0)).astype(int)
    x2, y2 = np.ceil(outline.max(axis=0)).astype(int) + 1
    x1, y1 = max(x1, 0), max(y1, 0)
    region = image[y1:y2, x1:x2]
    if region.size == 0:
        return
    height, width = region.shape[:2]
    level = rng.uniform(150, 205)
    direction = rng.uniform(0, 2 * math.pi)
    ramp = np.add.outer(
        np.arange(height, dtype=np.float32) * math.sin(direction),
        np.arange(width, dtype=np.float32) * math.cos(direction),
    ) / max(width, height)
    sheen = level + rng.uniform(15, 40) * ramp
    colour = np.clip(sheen[:, :, None] * (1 + rng.uniform(-0.04, 0.04, 3)), 0, 255).astype(np.uint8)
    mask = np.zeros((height, width), np.uint8)
    _fill(mask, outline - (x1, y1), (255,))
    np.copyto(region, colour, where=mask[:, :, None] > 127)
    edge = (level * 0.6,) * 3
    cv2.polylines(image, [np.round(outline * 16).astype(np.int32)], True, edge, 1, cv2.LINE_AA, shift=4)


def _hole(image: np.ndarray, centre: Points, radius: float) -> None:
    x, y = (round(v * 16) for v in centre)
    cv2.circle(image, (x, y), round(radius * 16), (28, 28, 30), -1, cv2.LINE_AA, shift=4)
    cv2.circle(image, (x, y), round(radius * 16), (110, 110, 115), 1, cv2.LINE_AA, shift=4)


def _part(
    rng: Rng, image: np.ndarray, unit: float, area: tuple[float, float, float, float], taken: list[_Slot]
) -> list[_Shape]:
    """A metal part: a plate with holes, a round flange or an L-shaped bracket; sometimes scratched."""
    kind = int(rng.choice(3, p=(0.5, 0.25, 0.25)))
    if kind == 0:
        return _plate(rng, image, unit, area, taken)
    if kind == 1:
        return _flange(rng, image, unit, area, taken)
    return _bracket(rng, image, unit, area, taken)


def _plate(
    rng: Rng, image: np.ndarray, unit: float, area: tuple[float, float, float, float], taken: list[_Slot]
) -> list[_Shape]:
    length, breadth = rng.uniform(100, 150) * unit, rng.uniform(70, 105) * unit
    in_pocket = rng.random() < 0.35
    border = rng.uniform(7, 11) * unit if in_pocket else 0.0
    slot = _place(rng, math.hypot(length, breadth) / 2 + border, area, taken)
    if slot is None:
        return []
    angle = rng.uniform(-35, 35)
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * (length / 2, breadth / 2)
    outline = _rotated(corners, angle, (slot.x, slot.y))
    if in_pocket:
        grown = corners + np.sign(corners) * border
        _pocket(rng, image, _rotated(grown, angle, (slot.x, slot.y)), unit)
    _shadow(image, outline, unit)
    _metal(rng, image, outline)
    hole = rng.uniform(5, 8) * unit
    for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))[: int(rng.integers(2, 5))]:
        local = np.array([[sx * (length / 2 - 2.2 * hole), sy * (breadth / 2 - 2.2 * hole)]])
        _hole(image, _rotated(local, angle, (slot.x, slot.y))[0], hole)
    shapes = [_Shape(PART, outline)]
    if rng.random() < SCRATCH_CHANCE:
        shapes += _scratch(rng, image, unit, (slot.x, slot.y), angle, _in_rectangle(length / 2, breadth / 2))
    return shapes


def _flange(
    rng: Rng, image: np.ndarray, unit: float, area: tuple[float, float, float, float], taken: list[_Slot]
) -> list[_Shape]:
    radius = rng.uniform(52, 70) * unit
    slot = _place(rng, radius, area, taken)
    if slot is None:
        return []
    angles = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    outline = np.stack([np.cos(angles), np.sin(angles)], axis=1) * radius + (slot.x, slot.y)
    _shadow(image, outline, unit)
    _metal(rng, image, outline)
    _hole(image, np.array([slot.x, slot.y]), 0.28 * radius)
    turn = rng.uniform(0, math.pi / 2)
    for k in range(4):
        bolt = np.array([math.cos(turn + k * math.pi / 2), math.sin(turn + k * math.pi / 2)]) * 0.68 * radius
        _hole(image, np.add(bolt, (slot.x, slot.y)), 0.09 * radius)
    shapes = [_Shape(PART, outline)]
    if rng.random() < SCRATCH_CHANCE:
        shapes += _scratch(rng, image, unit, (slot.x, slot.y), 0.0, _in_disc(radius))
    return shapes


def _bracket(
    rng: Rng, image: np.ndarray, unit: float, area: tuple[float, float, float, float], taken: list[_Slot]
) -> list[_Shape]:
    size = rng.uniform(95, 130) * unit
    arm = rng.uniform(0.36, 0.46) * size
    slot = _place(rng, size / math.sqrt(2), area, taken)
    if slot is None:
        return []
    half = size / 2
    local = np.array(
        [
            [-half, -half],
            [-half + arm, -half],
            [-half + arm, half - arm],
            [half, half - arm],
            [half, half],
            [-half, half],
        ]
    )
    angle = rng.uniform(0, 360)
    outline = _rotated(local, angle, (slot.x, slot.y))
    _shadow(image, outline, unit)
    _metal(rng, image, outline)
    hole = 0.16 * arm
    for spot in ((-half + arm / 2, -half + arm), (half - arm, half - arm / 2)):
        _hole(image, _rotated(np.array([spot]), angle, (slot.x, slot.y))[0], hole)
    return [_Shape(PART, outline)]


def _scratch(
    rng: Rng, image: np.ndarray, unit: float, centre: tuple[float, float], angle: float, inside: Inside
) -> list[_Shape]:
    """A thin dark gouge on a part, well away from the part's centre (so the two objects' centres fall in
    different cells of the detector's grid) and diagonal in the image (so its box is not a sliver)."""
    length = rng.uniform(32, 48) * unit
    tilt = math.radians(rng.choice((-1, 1)) * rng.uniform(28, 62) - angle)
    reach = np.array([math.cos(tilt), math.sin(tilt)]) * length / 2
    bend = np.array([-reach[1], reach[0]]) * rng.uniform(-0.15, 0.15)
    margin = 5 * unit
    for _ in range(PLACEMENT_TRIES):
        direction = rng.uniform(0, 2 * math.pi)
        offset = np.array([math.cos(direction), math.sin(direction)]) * rng.uniform(28, 60) * unit
        local = np.array([offset - reach, offset + bend, offset + reach])
        if inside(local, margin):
            break
    else:
        return []
    path = _rotated(local, angle, centre)
    thickness = max(3, round(rng.uniform(4.5, 6.5) * unit))  # still 2 to 3 pixels on the model's input
    depth = float(rng.uniform(12, 45))
    cv2.polylines(
        image, [np.round(path * 16).astype(np.int32)], False, (depth,) * 3, thickness, cv2.LINE_AA, 4
    )
    pad = thickness / 2
    outline = np.concatenate([np.add(path, (dx, dy)) for dx in (-pad, pad) for dy in (-pad, pad)])
    return [_Shape(SCRATCH, outline)]


def _in_rectangle(half_w: float, half_h: float) -> Inside:
    def inside(points: Points, margin: float) -> bool:
        return bool(np.all(np.abs(points) <= (half_w - margin, half_h - margin)))

    return inside


def _in_disc(radius: float) -> Inside:
    def inside(points: Points, margin: float) -> bool:
        return bool(np.all(np.hypot(points[:, 0], points[:, 1]) <= radius - margin))

    return inside


def _pocket(rng: Rng, image: np.ndarray, outline: Points, unit: float) -> None:
    """A recess of the carrier with a painted outline: where a part sits, or should."""
    _fill(image, outline, (float(rng.uniform(14, 32)),) * 3)
    paint = tuple(float(c * rng.uniform(0.75, 1.05)) for c in POCKET_YELLOW)
    thickness = max(2, round(rng.uniform(3, 5) * unit))
    cv2.polylines(image, [np.round(outline * 16).astype(np.int32)], True, paint, thickness, cv2.LINE_AA, 4)


def _missing_part(
    rng: Rng, image: np.ndarray, unit: float, area: tuple[float, float, float, float], taken: list[_Slot]
) -> list[_Shape]:
    """An empty pocket: the painted outline around a dark recess, with a cross marking the empty slot."""
    length, breadth = rng.uniform(105, 150) * unit, rng.uniform(80, 110) * unit
    slot = _place(rng, math.hypot(length, breadth) / 2, area, taken)
    if slot is None:
        return []
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * (length / 2, breadth / 2)
    outline = _rotated(corners, rng.uniform(-35, 35), (slot.x, slot.y))
    _pocket(rng, image, outline, unit)
    cross = outline * 0.7 + np.array([slot.x, slot.y]) * 0.3  # corners pulled towards the centre
    for a, b in ((0, 2), (1, 3)):
        ends = np.round(cross[[a, b]] * 16).astype(np.int32)
        cv2.line(image, tuple(ends[0]), tuple(ends[1]), (70, 70, 75), max(1, round(2 * unit)), cv2.LINE_AA, 4)
    thickness = max(2, round(5 * unit))
    centre = np.array([slot.x, slot.y])
    grown = centre + (outline - centre) * (1 + thickness / min(length, breadth))  # the paint's outer edge
    return [_Shape(MISSING_PART, grown)]


def _foreign_object(
    rng: Rng, image: np.ndarray, unit: float, area: tuple[float, float, float, float], taken: list[_Slot]
) -> list[_Shape]:
    """Debris: an irregular blob of saturated colour (plastic, rag, a wrong component)."""
    radius = rng.uniform(15, 30) * unit
    slot = _place(rng, radius, area, taken)
    if slot is None:
        return []
    corners = int(rng.integers(7, 12))
    angles = np.sort(rng.uniform(0, 2 * math.pi, corners))
    reach = radius * rng.uniform(0.55, 1.0, corners)
    outline = np.add(np.stack([np.cos(angles) * reach, np.sin(angles) * reach], axis=1), (slot.x, slot.y))
    low, high = DEBRIS_HUES[int(rng.choice(2, p=(0.15, 0.85)))]
    hsv = np.array(
        [[[rng.integers(low, high + 1), rng.integers(160, 256), rng.integers(140, 256)]]], np.uint8
    )
    colour = tuple(float(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])
    _shadow(image, outline, unit)
    _fill(image, outline, colour)
    darker = tuple(c * 0.6 for c in colour)
    inner = (outline - (slot.x, slot.y)) * 0.45 + (slot.x, slot.y)
    cv2.polylines(image, [np.round(inner * 16).astype(np.int32)], True, darker, 1, cv2.LINE_AA, 4)
    return [_Shape(FOREIGN_OBJECT, outline)]


# ---- the camera --------------------------------------------------------------------------------------------


def _camera(rng: Rng, image: np.ndarray, shapes: list[_Shape]) -> tuple[np.ndarray, list[_Shape]]:
    image, shapes = _perspective(rng, image, shapes)
    height, width = image.shape[:2]
    light = _lighting(rng, width, height)
    frame = cv2.multiply(_blur(rng, image), light, dtype=cv2.CV_32F)
    cv2.scaleAdd(_noise_view(rng, width, height), float(rng.uniform(1.5, 7)), frame, dst=frame)
    saturated = cv2.add(frame, 0.0, dtype=cv2.CV_8U)  # type: ignore[call-overload]  # a scalar, as above
    return saturated, shapes


def _perspective(rng: Rng, image: np.ndarray, shapes: list[_Shape]) -> tuple[np.ndarray, list[_Shape]]:
    """A mildly tilted camera; the outlines go through the same homography, so boxes stay exact."""
    height, width = image.shape[:2]
    corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)
    jitter = rng.uniform(-PERSPECTIVE_JITTER, PERSPECTIVE_JITTER, (4, 2)) * (width, height)
    homography = cv2.getPerspectiveTransform(corners, (corners + jitter).astype(np.float32))
    warped = cv2.warpPerspective(
        image, homography, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    moved = [
        _Shape(s.label, cv2.perspectiveTransform(s.outline[None].astype(np.float64), homography)[0])
        for s in shapes
    ]
    return warped, moved


def _lighting(rng: Rng, width: int, height: int) -> np.ndarray:
    """Exposure times a smooth gain: a gradient across the frame and a vignette."""
    ys, xs = np.mgrid[0:1:12j, 0:1:16j].astype(np.float32)
    slope_x, slope_y = rng.uniform(-0.35, 0.35, 2)
    vignette = rng.uniform(0, 0.35) * ((xs - 0.5) ** 2 + (ys - 0.5) ** 2) * 2
    gain = (1 + slope_x * (xs - 0.5) + slope_y * (ys - 0.5) - vignette) * rng.uniform(0.7, 1.3)
    tint = 1 + rng.uniform(-0.04, 0.04, 3).astype(np.float32)  # colour temperature
    light: np.ndarray = cv2.resize(gain[:, :, None] * tint, (width, height), interpolation=cv2.INTER_LINEAR)
    return light


def _blur(rng: Rng, image: np.ndarray) -> np.ndarray:
    """Nothing, focus blur or motion blur along the belt."""
    kind = rng.choice(3, p=(0.35, 0.35, 0.3))
    scale = min(image.shape[:2]) / REFERENCE_SIDE
    if kind == 1:
        return cv2.GaussianBlur(image, (0, 0), rng.uniform(0.4, 1.3) * scale)
    if kind == 2:
        length = max(2, round(rng.uniform(2, 6) * scale))
        kernel = np.full((1, length), 1 / length, np.float32)
        return cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT)
    return image


@functools.cache
def _noise_tile() -> np.ndarray:
    """Unit Gaussian noise per channel from a fixed seed, viewed at random offsets: far faster than fresh
    noise for every frame."""
    return np.random.default_rng(0x5EED).standard_normal((*NOISE_TILE, 3)).astype(np.float32)


def _noise_view(rng: Rng, width: int, height: int) -> np.ndarray:
    tile = _noise_tile()
    if height > NOISE_TILE[0] or width > NOISE_TILE[1]:  # larger than the tile: repeat it
        reps = (-(-height // NOISE_TILE[0]), -(-width // NOISE_TILE[1]), 1)
        tile = np.tile(tile, reps)
    top = int(rng.integers(tile.shape[0] - height + 1))
    left = int(rng.integers(tile.shape[1] - width + 1))
    view: np.ndarray = tile[top : top + height, left : left + width]
    return view


# ---- files -------------------------------------------------------------------------------------------------


def _frames(seed: int, count: int, size: tuple[int, int]) -> Iterator[Scene]:
    """Frame i of a run is render_scene(seed + i)."""
    for index in range(count):
        yield render_scene(seed + index, size)


def _truth_record(file: str | int, scene: Scene) -> dict[str, object]:
    height, width = scene.image.shape[:2]
    boxes = [
        {"label": CLASS_NAMES[b.label], "x1": b.x1, "y1": b.y1, "x2": b.x2, "y2": b.y2} for b in scene.boxes
    ]
    return {"file": file, "width": width, "height": height, "boxes": boxes}


def _write_truth(path: Path, seed: int, frames: list[dict[str, object]]) -> Path:
    document = {"classes": list(CLASS_NAMES), "seed": seed, "frames": frames}
    path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    return path


def write_frames(
    folder: Path, seed: int, count: int, size: tuple[int, int] = (640, 480), quality: int = 90
) -> Path:
    """frame_00000.jpg ... in folder and their ground_truth.json; returns the JSON's path."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index, scene in enumerate(_frames(seed, count, size)):
        name = f"frame_{index:05d}.jpg"
        if not cv2.imwrite(str(folder / name), scene.image, [cv2.IMWRITE_JPEG_QUALITY, quality]):
            raise OSError(f"cannot write {folder / name}")
        records.append(_truth_record(name, scene))
    return _write_truth(folder / "ground_truth.json", seed, records)


def write_video(path: Path, seed: int, count: int, size: tuple[int, int] = (640, 480), fps: int = 10) -> Path:
    """A video of count frames (MJPG in .avi, else mp4v) and its ground truth in path.with_suffix('.json'),
    where each frame's "file" is its index in the video. Returns the video's path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "MJPG" if path.suffix.lower() == ".avi" else "mp4v"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*codec), fps, size)
    if not writer.isOpened():
        raise OSError(f"cannot open a {codec} video writer for {path}")
    records = []
    try:
        for index, scene in enumerate(_frames(seed, count, size)):
            writer.write(scene.image)
            records.append(_truth_record(index, scene))
    finally:
        writer.release()
    _write_truth(path.with_suffix(".json"), seed, records)
    return path


def load_ground_truth(path: Path) -> list[tuple[str, tuple[Box, ...]]]:
    """(file, boxes) per frame from a ground-truth JSON; a video frame's file is its index as text."""
    document = json.loads(path.read_text(encoding="utf-8"))
    labels = {name: index for index, name in enumerate(document["classes"])}
    return [
        (
            str(frame["file"]),
            tuple(
                Box(labels[b["label"]], float(b["x1"]), float(b["y1"]), float(b["x2"]), float(b["y2"]))
                for b in frame["boxes"]
            ),
        )
        for frame in document["frames"]
    ]
