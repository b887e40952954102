"""Stable task ids through ``detfleet produce --deterministic-ids``: one task per distinct frame, and a
second run over the same source makes no new rows (the consumer counts its results as redeliveries)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from consumer.detector.fake import FakeDetector
from producer.sources import file_key
from shared.broker.aio import Broker
from shared.schema import frame_task_id
from shared.settings import AdminSettings
from shared.topology import QUEUE_BULK
from tests.integration.consumer_support import consumer_settings, rows_by_id, run_until_idle
from tests.integration.test_producer_publish import run_produce
from tests.support.broker import read_all
from tests.support.frames import jpeg_bytes, write_video


def produce_args(source: Path, *extra: str) -> list[str]:
    return ["--source", str(source), "--site", "site-a", "--camera", "cam-1", "--json", *extra]


async def test_distinct_images_read_in_one_go_are_one_task_each(
    topology_settings: AdminSettings, broker: Broker, tmp_path: Path
) -> None:
    # Tiny files are read within a millisecond of each other: the read time cannot tell them apart.
    for index in range(3):
        (tmp_path / f"{index}.jpg").write_bytes(jpeg_bytes(8, 8, seed=index))

    code, out, err = await run_produce(
        topology_settings.amqp_url, *produce_args(tmp_path, "--deterministic-ids")
    )

    assert code == 0, err
    assert json.loads(out)["confirmed"] == 3
    ids = [d.envelope.message_id for d in await read_all(broker, QUEUE_BULK)]
    assert len(set(ids)) == 3


async def test_the_same_folder_produced_twice_gives_no_new_rows_only_redeliveries(
    topology_settings: AdminSettings, tmp_path: Path, results_db: str
) -> None:
    images = {f"line/{index}.jpg": jpeg_bytes(seed=index) for index in range(4)}
    for name, body in images.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(body)
    settings = consumer_settings(topology_settings, results_db)

    for _ in range(2):
        code, _, err = await run_produce(
            topology_settings.amqp_url, *produce_args(tmp_path, "--deterministic-ids")
        )
        assert code == 0, err
        await run_until_idle(settings, FakeDetector())
        rows = await rows_by_id(results_db)
        assert len(rows) == 4

    assert {r["status"] for r in rows.values()} == {"ok"}
    assert [r["redeliveries"] for r in rows.values()] == [1] * 4
    assert set(rows) == {expected_id(name, body) for name, body in images.items()}


async def test_a_video_produced_twice_is_the_same_tasks_frame_by_frame(
    topology_settings: AdminSettings, broker: Broker, tmp_path: Path
) -> None:
    video = write_video(tmp_path / "clip.avi", frames=4)
    runs = []
    for _ in range(2):
        code, _, err = await run_produce(
            topology_settings.amqp_url, *produce_args(video, "--deterministic-ids")
        )
        assert code == 0, err
        runs.append([d.envelope.message_id for d in await read_all(broker, QUEUE_BULK)])

    assert runs[0] == runs[1]
    assert len(set(runs[0])) == 4


def expected_id(name: str, body: bytes) -> uuid.UUID:
    return frame_task_id("site-a", "cam-1", file_key(Path(name), body))
