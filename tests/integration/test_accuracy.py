"""The shipped detector through the whole fleet: producer, broker, consumer, Postgres.

Accuracy is measured on generated frames the model never saw in training, and the fleet's boxes are checked
against the same detector run in-process on the same decode (consumer.decode.decode_frame, reduced scale
where the frame allows it), so batching, letterboxing and the row's JSON change nothing.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import cv2
import pytest

from consumer.decode import decode_frame
from consumer.detector import DetectorConfig, load_detector
from consumer.detector.base import DecodedFrame, Detector
from detfleet import accuracy, synth
from detfleet.demo import as_box
from producer.publisher import AsyncPublisher
from shared.settings import AdminSettings, ProducerSettings, shipped_model_path
from tests.integration.consumer_support import consumer_settings, rows_by_id, run_until_idle

# Seeds far from the training range (see models/README.md): frames the model never saw.
HELD_OUT_SEED = 7_000_000
HELD_OUT_FRAMES = 120
MIN_PRECISION = MIN_RECALL = 0.9  # the model card reports more on a larger held-out set
SIZES = ((500, 375), (375, 500), (1280, 720), (333, 250))  # decoded for the 320 model at 1/1, 1/1, 1/4, 1/1
# Three times each, then three 640x480 frames (decoded at 1/2); every one of these seeds carries objects.
FRAMES = [*SIZES * 3, *[(640, 480)] * 3]


@pytest.fixture(scope="module")
def detector() -> Detector:
    return load_detector(DetectorConfig(model_path=shipped_model_path(), device="cpu"))


def encoded(scene: synth.Scene) -> bytes:
    ok, data = cv2.imencode(".jpg", scene.image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return bytes(data)


async def through_the_fleet(
    admin: AdminSettings, database_url: str, detector: Detector, bodies: list[bytes]
) -> list[dict[str, Any]]:
    """Publish with the producer library, consume until idle, return the rows in publish order."""
    producer = ProducerSettings(amqp_url=admin.amqp_url, producer_name="accuracy-test")
    async with AsyncPublisher(producer) as publisher:
        ids: list[uuid.UUID] = [await publisher.publish(b, camera="cam-1", site="line-1") for b in bodies]
    await run_until_idle(consumer_settings(admin, database_url, max_batch=16), detector)
    rows = await rows_by_id(database_url)
    assert set(rows) == set(ids)
    return [rows[i] for i in ids]


def detections_of(row: dict[str, Any]) -> list[dict[str, Any]]:
    assert row["status"] == "ok", row["reason"]
    found = row["detections"]
    return list(json.loads(found) if isinstance(found, str) else found)


def as_boxes(row: dict[str, Any]) -> tuple[synth.Box, ...]:
    return tuple(as_box(d) for d in detections_of(row))


async def test_the_fleet_finds_the_parts_and_defects_on_held_out_frames(
    topology_settings: AdminSettings, results_db: str, detector: Detector
) -> None:
    scenes = [synth.render_scene(HELD_OUT_SEED + i) for i in range(HELD_OUT_FRAMES)]

    rows = await through_the_fleet(topology_settings, results_db, detector, [encoded(s) for s in scenes])

    scores = accuracy.score([as_boxes(r) for r in rows], [s.boxes for s in scenes], synth.CLASS_NAMES)
    assert scores.true_positives > HELD_OUT_FRAMES  # the frames carry objects and the fleet found them
    assert scores.precision >= MIN_PRECISION, scores
    assert scores.recall >= MIN_RECALL, scores


def sorted_detections(found: list[dict[str, Any]]) -> list[tuple[int, float, list[float]]]:
    # By class, then position: two objects may score the same, their boxes differ.
    items = [(int(d["class_id"]), float(d["score"]), [float(v) for v in d["box"]]) for d in found]
    return sorted(items, key=lambda item: (item[0], item[2]))


async def test_the_fleet_boxes_equal_the_detector_run_in_process_on_non_square_frames(
    topology_settings: AdminSettings, results_db: str, detector: Detector
) -> None:
    bodies = [encoded(synth.render_scene(HELD_OUT_SEED + 500 + i, size)) for i, size in enumerate(FRAMES)]

    rows = await through_the_fleet(topology_settings, results_db, detector, bodies)

    reductions: set[int] = set()
    for body, row, size in zip(bodies, rows, FRAMES, strict=True):
        frame = decode_frame(body, detector.info.input_size)
        assert isinstance(frame, DecodedFrame), frame
        reductions.add(frame.reduction)
        assert (row["image_width"], row["image_height"]) == frame.source_size == size
        fleet = sorted_detections(detections_of(row))
        alone = sorted_detections([d.to_json() for d in detector.detect([frame])[0]])
        assert fleet, "every generated frame here carries objects"
        assert [c for c, _, _ in fleet] == [c for c, _, _ in alone]
        for (_, fleet_score, fleet_box), (_, score, box) in zip(fleet, alone, strict=True):
            assert fleet_score == pytest.approx(score, abs=1e-4)
            assert fleet_box == pytest.approx(box, abs=0.5)
    assert reductions == {1, 2, 4}  # for the 320 model: 640x480 at 1/2, 1280x720 at 1/4, the others in full
