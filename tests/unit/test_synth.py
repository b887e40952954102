"""The frame generator: deterministic, exact boxes inside the frame, every class, files as cameras send."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from detfleet import synth

SIZES = ((640, 480), (500, 375), (375, 500), (1280, 720), (333, 250), (64, 48))


def test_the_same_seed_draws_the_same_frame_and_boxes() -> None:
    first, again = synth.render_scene(123), synth.render_scene(123)

    assert np.array_equal(first.image, again.image)
    assert first.boxes == again.boxes


def test_a_different_seed_draws_a_different_frame() -> None:
    first, other = synth.render_scene(123), synth.render_scene(124)

    assert not np.array_equal(first.image, other.image)
    assert first.boxes != other.boxes


@pytest.mark.parametrize("size", SIZES)
def test_frames_have_the_asked_size_and_boxes_inside_them(size: tuple[int, int]) -> None:
    width, height = size
    for seed in range(25):
        scene = synth.render_scene(seed, size)

        assert scene.image.shape == (height, width, 3)
        assert scene.image.dtype == np.uint8
        assert len(scene.boxes) <= synth.MAX_OBJECTS
        for box in scene.boxes:
            assert 0 <= box.x1 < box.x2 <= width
            assert 0 <= box.y1 < box.y2 <= height
            assert min(box.x2 - box.x1, box.y2 - box.y1) >= min(size) / 100  # not a sliver
            assert 0 <= box.label < len(synth.CLASS_NAMES)
            assert box.score == 1.0


def test_portrait_frames_run_the_belt_along_the_long_side() -> None:
    landscape = synth.render_scene(7, (500, 375))
    portrait = synth.render_scene(7, (375, 500))

    assert np.array_equal(portrait.image, landscape.image.transpose(1, 0, 2))
    assert [(b.y1, b.x1, b.y2, b.x2) for b in portrait.boxes] == [
        (b.x1, b.y1, b.x2, b.y2) for b in landscape.boxes
    ]


def test_every_class_appears_and_frames_carry_zero_to_eight_objects() -> None:
    scenes = [synth.render_scene(seed) for seed in range(200)]
    classes = Counter(box.label for scene in scenes for box in scene.boxes)
    counts = Counter(len(scene.boxes) for scene in scenes)

    assert set(classes) == set(range(len(synth.CLASS_NAMES)))
    assert min(classes.values()) >= 50  # enough of each to train and measure on
    assert counts[0] > 0
    assert max(counts) <= synth.MAX_OBJECTS


def test_a_scratch_lies_on_a_part() -> None:
    for seed in range(100):
        scene = synth.render_scene(seed)
        parts = [b for b in scene.boxes if b.label == synth.PART]
        for scratch in (b for b in scene.boxes if b.label == synth.SCRATCH):
            assert any(
                p.x1 <= scratch.x1 and p.y1 <= scratch.y1 and scratch.x2 <= p.x2 and scratch.y2 <= p.y2
                for p in parts
            )


def test_the_boxes_frame_what_was_drawn() -> None:
    """Debris is saturated colour on a grey belt: its pixels lie inside its box, not outside it."""
    for seed in range(200):
        scene = synth.render_scene(seed)
        debris = [b for b in scene.boxes if b.label == synth.FOREIGN_OBJECT]
        if len(debris) != 1 or len(scene.boxes) != 1:
            continue
        hsv = cv2.cvtColor(scene.image, cv2.COLOR_BGR2HSV)
        ys, xs = np.nonzero((hsv[:, :, 1] > 120) & (hsv[:, :, 2] > 100))  # bright and saturated
        box = debris[0]
        inside = (xs >= box.x1 - 3) & (xs <= box.x2 + 3) & (ys >= box.y1 - 3) & (ys <= box.y2 + 3)
        assert inside.mean() > 0.95
        assert xs.min() <= box.x1 + 3
        assert xs.max() >= box.x2 - 3
        return
    pytest.fail("no frame with debris alone in the first 200 seeds")


def test_tiny_frames_are_refused() -> None:
    with pytest.raises(ValueError, match="too small"):
        synth.render_scene(1, (16, 16))


def test_written_frames_and_their_ground_truth_round_trip(tmp_path: Path) -> None:
    truth_path = synth.write_frames(tmp_path / "frames", seed=40, count=3, size=(320, 240))

    loaded = synth.load_ground_truth(truth_path)
    document = json.loads(truth_path.read_text())

    assert truth_path == tmp_path / "frames" / "ground_truth.json"
    assert document["classes"] == list(synth.CLASS_NAMES)
    assert document["seed"] == 40
    assert [file for file, _ in loaded] == ["frame_00000.jpg", "frame_00001.jpg", "frame_00002.jpg"]
    for index, (file, boxes) in enumerate(loaded):
        assert boxes == synth.render_scene(40 + index, (320, 240)).boxes
        image = cv2.imread(str(tmp_path / "frames" / file))
        assert image is not None
        assert image.shape == (240, 320, 3)
        assert (document["frames"][index]["width"], document["frames"][index]["height"]) == (320, 240)


@pytest.mark.parametrize("name", ["belt.avi", "belt.mp4"])
def test_a_written_video_reads_back_with_every_frame_and_its_ground_truth(tmp_path: Path, name: str) -> None:
    video = synth.write_video(tmp_path / name, seed=9, count=5, size=(320, 240), fps=10)

    capture = cv2.VideoCapture(str(video))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    truth = synth.load_ground_truth(video.with_suffix(".json"))

    assert len(frames) == 5
    assert all(frame.shape == (240, 320, 3) for frame in frames)
    assert [file for file, _ in truth] == ["0", "1", "2", "3", "4"]
    assert [boxes for _, boxes in truth] == [synth.render_scene(9 + i, (320, 240)).boxes for i in range(5)]
