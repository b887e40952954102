"""The consumer against the real RabbitMQ and Postgres, with the fake detector."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from consumer.detector.fake import FakeDetector
from shared import admin
from shared.broker.aio import Broker
from shared.management import Management
from shared.schema import H_REASON
from shared.settings import AdminSettings
from shared.topology import QUEUE_DLQ
from tests.integration.consumer_support import (
    consumer_settings,
    drain_queue,
    jpeg,
    make_task,
    publish,
    rows_by_id,
    run_until_idle,
    white_jpeg,
)
from tests.support.broker import override_policy


async def test_every_frame_gets_one_ok_row_and_the_dlq_stays_empty(
    broker: Broker, topology_settings: AdminSettings, results_db: str
) -> None:
    tasks = [make_task(lane="bulk" if i % 3 else "realtime", camera=f"cam-{i % 2}") for i in range(20)]
    for i, task in enumerate(tasks):
        await publish(broker, task, jpeg(i))

    worker = await run_until_idle(consumer_settings(topology_settings, results_db), FakeDetector())

    rows = await rows_by_id(results_db)
    assert set(rows) == {t.task_id for t in tasks}
    assert {r["status"] for r in rows.values()} == {"ok"}
    row = rows[tasks[0].task_id]
    assert (row["camera_id"], row["site"], row["lane"], row["trace_id"]) == (
        "cam-0",
        "site-a",
        "realtime",
        tasks[0].trace_id,
    )
    assert row["model_name"] == worker.detector.info.name
    assert (row["image_width"], row["image_height"]) == (160, 120)
    assert isinstance(row["detections"], str | list)
    assert await drain_queue(broker, QUEUE_DLQ) == []
    assert worker.held() == 0


async def test_a_task_published_twice_gives_one_row_and_one_absorbed_redelivery(
    broker: Broker, topology_settings: AdminSettings, results_db: str
) -> None:
    task = make_task()
    await publish(broker, task, jpeg(1))
    await publish(broker, task, jpeg(1))

    await run_until_idle(consumer_settings(topology_settings, results_db), FakeDetector())

    rows = await rows_by_id(results_db)
    assert list(rows) == [task.task_id]
    assert rows[task.task_id]["status"] == "ok"
    assert rows[task.task_id]["redeliveries"] == 1


async def test_a_corrupt_jpeg_fails_alone_and_its_neighbours_succeed(
    broker: Broker, topology_settings: AdminSettings, results_db: str
) -> None:
    good = [make_task() for _ in range(6)]
    bad = make_task()
    for i, task in enumerate(good[:3]):
        await publish(broker, task, jpeg(i))
    await publish(broker, bad, jpeg(99)[:200])  # truncated: the header is there, the pixels are not
    for i, task in enumerate(good[3:]):
        await publish(broker, task, jpeg(10 + i))

    await run_until_idle(consumer_settings(topology_settings, results_db, max_wait_ms=500), FakeDetector())

    rows = await rows_by_id(results_db)
    assert all(rows[t.task_id]["status"] == "ok" for t in good)
    assert rows[bad.task_id]["status"] == "failed"
    [entry] = await drain_queue(broker, QUEUE_DLQ)
    assert entry.message_id == str(bad.task_id)
    assert entry.headers[H_REASON] == rows[bad.task_id]["reason"]
    assert "decode" in entry.headers[H_REASON] or "JPEG" in entry.headers[H_REASON]
    assert entry.headers["x-detfleet-original-routing-key"] == bad.routing_key


async def test_a_bad_message_reusing_an_ok_task_id_does_not_change_its_row(
    broker: Broker, topology_settings: AdminSettings, results_db: str
) -> None:
    task = make_task()
    await publish(broker, task, jpeg(3))
    settings = consumer_settings(topology_settings, results_db)
    await run_until_idle(settings, FakeDetector())
    before = (await rows_by_id(results_db))[task.task_id]

    await publish(broker, task, b"GIF89a not a frame")
    await run_until_idle(settings, FakeDetector())

    after = (await rows_by_id(results_db))[task.task_id]
    assert after["status"] == "ok"
    assert after["detections"] == before["detections"]
    assert after["redeliveries"] == 1
    [entry] = await drain_queue(broker, QUEUE_DLQ)
    assert "GIF" in entry.headers[H_REASON]


async def test_a_poison_image_is_isolated_by_bisection_retried_then_dead_lettered(
    broker: Broker, admin_settings: AdminSettings, results_db: str
) -> None:
    settings = admin_settings.model_copy(update={"retry_delays_ms": (50, 100)})
    await admin.apply_topology(settings)
    poison_body = white_jpeg()
    detector = FakeDetector(fail_on=lambda image: float(image.mean()) > 250)
    tasks = [make_task() for _ in range(7)]
    poison = make_task()
    async with _broker(settings) as publisher:
        for i, task in enumerate(tasks[:4]):
            await publish(publisher, task, jpeg(i))
        await publish(publisher, poison, poison_body)
        for i, task in enumerate(tasks[4:]):
            await publish(publisher, task, jpeg(20 + i))

        await run_until_idle(
            consumer_settings(settings, results_db, max_retries=2, max_wait_ms=300), detector
        )

        rows = await rows_by_id(results_db)
        assert all(rows[t.task_id]["status"] == "ok" for t in tasks)
        assert rows[poison.task_id]["status"] == "failed"
        assert rows[poison.task_id]["attempt"] == 3
        [entry] = await drain_queue(publisher, QUEUE_DLQ)
    assert entry.headers["x-detfleet-attempt"] == 3
    assert "gave up after 3 attempts" in entry.headers[H_REASON]
    assert max(detector.batch_sizes) > 1  # the poison did arrive inside a batch, and was bisected out


async def test_frames_past_their_deadline_are_shed_on_realtime_and_failed_on_bulk(
    broker: Broker, topology_settings: AdminSettings, results_db: str
) -> None:
    past = datetime.now(UTC) - timedelta(minutes=5)
    late_realtime = make_task("realtime", captured_at=past, deadline=past + timedelta(seconds=10))
    late_bulk = make_task("bulk", deadline=past)
    await publish(broker, late_realtime, jpeg(1))
    await publish(broker, late_bulk, jpeg(2))

    await run_until_idle(consumer_settings(topology_settings, results_db), FakeDetector())

    rows = await rows_by_id(results_db)
    assert (rows[late_realtime.task_id]["status"], rows[late_realtime.task_id]["reason"]) == (
        "shed",
        "deadline exceeded",
    )
    assert (rows[late_bulk.task_id]["status"], rows[late_bulk.task_id]["reason"]) == (
        "failed",
        "deadline exceeded",
    )
    [entry] = await drain_queue(broker, QUEUE_DLQ)
    assert (entry.message_id, entry.headers[H_REASON]) == (str(late_bulk.task_id), "deadline exceeded")


async def test_frames_the_broker_expired_become_shed_or_failed_rows(
    broker: Broker, management: Management, topology_settings: AdminSettings, results_db: str
) -> None:
    for queue in ("detfleet.realtime", "detfleet.bulk"):
        await override_policy(management, topology_settings, queue, **{"message-ttl": 1})
    expired_realtime, expired_bulk = make_task("realtime"), make_task("bulk")
    await publish(broker, expired_realtime, jpeg(1))
    await publish(broker, expired_bulk, jpeg(2))

    await run_until_idle(consumer_settings(topology_settings, results_db), FakeDetector())

    rows = await rows_by_id(results_db)
    assert rows[expired_realtime.task_id]["status"] == "shed"
    assert "expired in detfleet.realtime" in rows[expired_realtime.task_id]["reason"]
    assert rows[expired_bulk.task_id]["status"] == "failed"
    assert "expired in detfleet.bulk" in rows[expired_bulk.task_id]["reason"]
    [entry] = await drain_queue(broker, QUEUE_DLQ)
    assert (entry.message_id, entry.headers[H_REASON]) == (
        str(expired_bulk.task_id),
        rows[expired_bulk.task_id]["reason"],
    )
    assert "x-death" not in entry.headers


@contextlib.asynccontextmanager
async def _broker(settings: AdminSettings) -> AsyncIterator[Broker]:
    broker = await Broker.connect(settings.amqp_url, "test:publisher")
    try:
        yield broker
    finally:
        await broker.close()
