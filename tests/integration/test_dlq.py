"""`detfleet dlq`: list leaves entries in place, replay sends them back to their lane once, purge empties."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from consumer.detector.fake import FakeDetector
from detfleet import dlq
from shared import admin, db
from shared.broker.aio import Broker
from shared.schema import H_ATTEMPT, H_REASON, Task, dead_letter_copy
from shared.settings import AdminSettings
from shared.topology import EXCHANGE_DLQ, QUEUE_BULK, QUEUE_DLQ
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


async def park(broker: Broker, reason: str, task: Task | None = None) -> str:
    """Put a dead-letter entry of ``task`` (a new one by default) into the DLQ."""
    task = task or make_task()
    envelope = task.to_envelope(jpeg(1))
    copy = dead_letter_copy(envelope, reason, attempt=4, failed_at=datetime.now(UTC))
    await broker.publish(copy, EXCHANGE_DLQ)
    return str(task.task_id)


async def test_list_shows_entries_and_leaves_them_in_order(broker: Broker) -> None:
    parked = [await park(broker, f"reason {i}") for i in range(3)]

    entries = await dlq.list_entries(broker, limit=10)

    assert [e.task_id for e in entries] == parked
    assert [e.reason for e in entries] == ["reason 0", "reason 1", "reason 2"]
    assert entries[0].routing_key == "bulk.site-a.cam-1"
    assert [e.task_id for e in await dlq.list_entries(broker, limit=10)] == parked


async def test_replay_republishes_once_per_task_to_the_original_lane(broker: Broker) -> None:
    task = make_task(camera="cam-7")
    first = await park(broker, "inference failed", task)
    await park(broker, "inference failed", task)  # a crash between DLQ copy and ack leaves two
    other = await park(broker, "corrupt image")

    report = await dlq.replay(broker, limit=10, reason_contains="inference")

    assert (report.replayed, report.duplicates, report.skipped) == (1, 1, 1)
    [back] = await drain_queue(broker, QUEUE_BULK)
    assert back.message_id == first
    assert back.routing_key == "bulk.site-a.cam-7"
    assert back.headers[H_ATTEMPT] == 1
    assert H_REASON not in back.headers
    assert [e.task_id for e in await dlq.list_entries(broker, limit=10)] == [other]


async def test_purge_empties_the_dlq(broker: Broker) -> None:
    for i in range(4):
        await park(broker, f"reason {i}")
    assert await broker.purge(QUEUE_DLQ) == 4
    assert await dlq.list_entries(broker, limit=10) == []


@pytest.fixture
async def fast_retries(admin_settings: AdminSettings) -> AdminSettings:
    settings = admin_settings.model_copy(update={"retry_delays_ms": (50,)})
    await admin.apply_topology(settings)
    return settings


async def test_a_replayed_failure_becomes_ok_once_the_cause_is_fixed(
    fast_retries: AdminSettings, database_url: str
) -> None:
    await db.migrate(database_url)
    settings = consumer_settings(fast_retries, database_url, max_retries=1)
    broker = await Broker.connect(fast_retries.amqp_url, "test:replay")
    try:
        task = make_task()
        await publish(broker, task, white_jpeg())
        await run_until_idle(settings, FakeDetector(fail_on=lambda image: float(image.mean()) > 250))
        assert (await rows_by_id(database_url))[task.task_id]["status"] == "failed"

        assert (await dlq.replay(broker, limit=10)).replayed == 1
        await run_until_idle(settings, FakeDetector())
    finally:
        await broker.close()

    row = (await rows_by_id(database_url))[task.task_id]
    assert (row["status"], row["reason"], row["redeliveries"]) == ("ok", None, 1)
