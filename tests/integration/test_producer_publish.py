"""The publisher on the real broker: the wire contract, unroutable frames, refusals, both APIs, the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from producer.blocking import BlockingPublisher
from producer.metrics import ProducerMetrics
from producer.publisher import AsyncPublisher
from shared.broker.aio import Broker
from shared.errors import FrameRejectedError, TaskValidationError, UnroutableError
from shared.management import Management
from shared.schema import Task, format_time
from shared.settings import AdminSettings, ProducerSettings
from shared.topology import QUEUE_BULK, QUEUE_REALTIME, vhost_of
from tests.support.broker import read_all
from tests.support.frames import jpeg_bytes, png_bytes, png_header_only, write_video

pytestmark = pytest.mark.integration


def producer_settings(topology: AdminSettings, **changes: Any) -> ProducerSettings:
    return ProducerSettings(amqp_url=topology.amqp_url, producer_name="gateway-7", **changes)


async def test_a_bulk_frame_lands_in_the_bulk_lane_with_every_property_and_header_of_the_contract(
    topology_settings: AdminSettings, broker: Broker
) -> None:
    body = jpeg_bytes(seed=5)
    captured = datetime(2026, 11, 23, 8, 0, 0, 123456, tzinfo=UTC)

    async with AsyncPublisher(producer_settings(topology_settings)) as publisher:
        task_id = await publisher.publish(
            body, camera="cam-1", site="site-a", captured_at=captured, trace_id="tr-1"
        )

    [delivery] = await read_all(broker, QUEUE_BULK)
    envelope = delivery.envelope
    assert envelope.body == body
    assert envelope.routing_key == "bulk.site-a.cam-1"
    assert envelope.message_id == str(task_id)
    assert envelope.delivery_mode == 2
    assert envelope.app_id == "gateway-7"
    assert envelope.timestamp is not None
    assert abs(envelope.timestamp.replace(tzinfo=UTC) - datetime.now(UTC)) < timedelta(minutes=1)
    assert envelope.expiration_ms is None
    published_ms = envelope.headers["x-detfleet-published-at"]
    assert dict(envelope.headers) == {
        "x-detfleet-schema": 1,
        "camera_id": "cam-1",
        "site": "site-a",
        "captured_at": "2026-11-23T08:00:00.123Z",
        "trace_id": "tr-1",
        "x-detfleet-attempt": 1,
        "x-detfleet-published-at": published_ms,
    }
    task = Task.from_envelope(envelope)
    assert task.task_id == task_id
    # The consumer's queue wait starts at the millisecond header, not the whole-second property.
    assert task.published_at == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=published_ms)


async def test_a_realtime_frame_carries_its_deadline_and_an_expiration_from_it(
    topology_settings: AdminSettings, broker: Broker
) -> None:
    captured = datetime.now(UTC)

    async with AsyncPublisher(producer_settings(topology_settings)) as publisher:
        task_id = await publisher.publish(
            png_bytes(), camera="cam-2", site="site-a", lane="realtime", captured_at=captured
        )

    [delivery] = await read_all(broker, QUEUE_REALTIME)
    envelope = delivery.envelope
    assert envelope.routing_key == "realtime.site-a.cam-2"
    assert envelope.message_id == str(task_id)
    assert envelope.headers["x-detfleet-deadline"] == format_time(captured + timedelta(seconds=10))
    assert envelope.headers["trace_id"] == task_id.hex
    assert envelope.expiration_ms is not None
    assert 0 < envelope.expiration_ms <= 10_000
    assert await broker.queue_depth(QUEUE_BULK) == 0


async def test_deterministic_ids_make_a_resent_frame_the_same_task(
    topology_settings: AdminSettings, broker: Broker
) -> None:
    captured = datetime.now(UTC)
    settings = producer_settings(topology_settings)

    async with AsyncPublisher(settings, deterministic_ids=True) as publisher:
        first = await publisher.publish(jpeg_bytes(), camera="cam-1", site="site-a", captured_at=captured)
        again = await publisher.publish(jpeg_bytes(), camera="cam-1", site="site-a", captured_at=captured)
        other = await publisher.publish(
            jpeg_bytes(), camera="cam-1", site="site-a", captured_at=captured + timedelta(milliseconds=1)
        )

    assert first == again != other
    assert [d.envelope.message_id for d in await read_all(broker, QUEUE_BULK)] == [str(first)] * 2 + [
        str(other)
    ]


async def test_an_unroutable_publish_raises_and_is_counted(
    topology_settings: AdminSettings, management: Management
) -> None:
    vhost = vhost_of(topology_settings.amqp_url)
    await management.request(
        "PUT", f"/exchanges/{quote(vhost, safe='')}/test.unbound", {"type": "topic", "durable": False}
    )
    metrics = ProducerMetrics()

    async with AsyncPublisher(
        producer_settings(topology_settings), metrics=metrics, exchange="test.unbound"
    ) as pub:
        with pytest.raises(UnroutableError, match="unroutable"):
            await pub.publish(jpeg_bytes(), camera="cam-1", site="site-a")

    assert metrics.counts()["returned"] == 1
    assert metrics.counts()["confirmed"] == 0


async def test_frames_off_the_contract_are_refused_before_anything_is_sent(
    topology_settings: AdminSettings, broker: Broker
) -> None:
    metrics = ProducerMetrics()

    async with AsyncPublisher(producer_settings(topology_settings), metrics=metrics) as publisher:
        with pytest.raises(FrameRejectedError, match="over the 40-megapixel limit"):
            await publisher.publish(png_header_only(9000, 9000), camera="cam-1", site="site-a")
        with pytest.raises(FrameRejectedError, match="looks like GIF"):
            await publisher.publish(b"GIF89a" + bytes(100), camera="cam-1", site="site-a")
        with pytest.raises(TaskValidationError, match="camera must match"):
            await publisher.publish(jpeg_bytes(), camera="cam.1", site="site-a")

    assert metrics.counts()["refused"] == 2
    assert metrics.counts()["published"] == 0
    assert await broker.queue_depth(QUEUE_BULK) == 0


async def test_the_blocking_api_publishes_from_gateway_threads(
    topology_settings: AdminSettings, broker: Broker
) -> None:
    body = jpeg_bytes(seed=11)

    def gateway() -> list[uuid.UUID]:
        with BlockingPublisher(producer_settings(topology_settings)) as publisher:
            confirmed = publisher.publish(body, camera="cam-1", site="site-a")
            queued = publisher.submit(body, camera="cam-1", site="site-a", lane="realtime")
            return [confirmed, queued.result(timeout=10)]

    confirmed, queued = await asyncio.to_thread(gateway)

    assert [d.envelope.message_id for d in await read_all(broker, QUEUE_BULK)] == [str(confirmed)]
    assert [d.envelope.message_id for d in await read_all(broker, QUEUE_REALTIME)] == [str(queued)]


async def run_produce(amqp_url: str, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETFLEET_")}
    env |= {"DETFLEET_AMQP_URL": amqp_url, "DETFLEET_LOG_JSON": "false"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "detfleet",
        "produce",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, out.decode(), err.decode()


async def test_produce_json_counts_match_what_the_lane_holds(
    topology_settings: AdminSettings, broker: Broker, tmp_path: Path
) -> None:
    images = [jpeg_bytes(seed=i) for i in range(3)] + [png_bytes(seed=9)]
    for index, body in enumerate(images):
        (tmp_path / f"{index}.img").write_bytes(body)
    (tmp_path / "readme.txt").write_text("skip me")
    (tmp_path / "zz-huge.png").write_bytes(png_header_only(9000, 9000))

    code, out, err = await run_produce(
        topology_settings.amqp_url,
        "--source",
        str(tmp_path),
        "--site",
        "site-a",
        "--camera",
        "cam-1",
        "--json",
    )

    assert code == 0, err
    summary = json.loads(out)
    assert {
        k: summary[k] for k in ("published", "confirmed", "returned", "refused", "skipped", "dropped")
    } == {
        "published": 4,
        "confirmed": 4,
        "returned": 0,
        "refused": 1,
        "skipped": 1,
        "dropped": 0,
    }
    assert summary["seconds"] > 0
    assert summary["frames_per_s"] > 0
    assert [d.envelope.body for d in await read_all(broker, QUEUE_BULK)] == images
    assert "readme.txt" in err
    assert "zz-huge.png" in err


async def test_produce_sends_video_frames_to_the_realtime_lane_up_to_its_limit(
    topology_settings: AdminSettings, broker: Broker, tmp_path: Path
) -> None:
    video = write_video(tmp_path / "clip.avi", frames=8)

    code, out, err = await run_produce(
        topology_settings.amqp_url,
        "--source",
        str(video),
        "--site",
        "site-a",
        "--camera",
        "cam-3",
        "--lane",
        "realtime",
        "--limit",
        "5",
        "--fps",
        "100",
        "--json",
    )

    assert code == 0, err
    assert json.loads(out)["confirmed"] == 5
    deliveries = await read_all(broker, QUEUE_REALTIME)
    assert len(deliveries) == 5
    assert {d.envelope.routing_key for d in deliveries} == {"realtime.site-a.cam-3"}
