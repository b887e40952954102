"""Failures the chaos soak's accounting points at, each pinned down on its own against the real servers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pytest

from consumer.detector.fake import FakeDetector
from shared.broker.aio import Broker
from shared.management import Management
from shared.schema import H_REASON
from shared.settings import AdminSettings
from shared.topology import EXCHANGE_DLQ, QUEUE_DLQ, QUEUE_REALTIME
from tests.integration.consumer_support import (
    consumer_settings,
    drain_queue,
    jpeg,
    make_task,
    publish,
    rows_by_id,
    running,
)

pytestmark = pytest.mark.integration

POLL_S = 0.05
WAIT_S = 30.0  # a bound against hangs, never a timing assertion
DEADLINE_IN_S = 4.0  # far enough for the first delivery to come before it, near enough to wait for


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await check():
        assert time.monotonic() < deadline, f"gave up waiting until {what}"
        await asyncio.sleep(POLL_S)


def _dlq_binding(vhost: str) -> str:
    return f"/bindings/{quote(vhost, safe='')}/e/{EXCHANGE_DLQ}/q/{QUEUE_DLQ}"


async def test_a_failed_row_whose_dlq_copy_was_lost_gets_it_from_a_redelivery_past_the_deadline(
    broker: Broker, management: Management, vhost: str, topology_settings: AdminSettings, results_db: str
) -> None:
    """A realtime frame that cannot be decoded gets its failed row, but its DLQ copy does not make it (here
    unroutable; in the soak a cut link or a kill -9 between the two). Its redelivery comes past the
    deadline, where the settle table only sheds, and a failed row is never replaced by a shed one: the
    task must still end with its DLQ entry, or its failed row points at nothing."""
    await management.request("DELETE", _dlq_binding(vhost) + "/~")
    deadline = datetime.now(UTC) + timedelta(seconds=DEADLINE_IN_S)
    task = make_task("realtime", deadline=deadline)
    frame = jpeg(1)
    settings = consumer_settings(topology_settings, results_db, exit_when_idle_s=None)
    async with running(settings, FakeDetector()) as worker:
        await publish(broker, task, frame[: len(frame) // 2])
        await eventually(lambda: _status_is(results_db, task.task_id, "failed"), "the failed row is written")
        await eventually(lambda: _after(deadline), "the deadline passed")
        seen = await _redeliveries(results_db, task.task_id)
        await eventually(
            lambda: _redeliveries_above(results_db, task.task_id, seen), "a delivery past the deadline"
        )

        await management.request("POST", _dlq_binding(vhost), {"routing_key": ""})
        await eventually(lambda: _depth_at_least(broker, QUEUE_DLQ, 1), "the DLQ entry arrives")
        await eventually(lambda: _settled(broker, worker.held), "the frame is settled")

    row = (await rows_by_id(results_db))[task.task_id]
    assert row["status"] == "failed"
    entries = await drain_queue(broker, QUEUE_DLQ)
    assert {e.message_id for e in entries} == {str(task.task_id)}
    assert {e.headers[H_REASON] for e in entries} == {row["reason"]}


async def _after(moment: datetime) -> bool:
    return datetime.now(UTC) > moment


async def _status_is(database_url: str, task_id: uuid.UUID, status: str) -> bool:
    row = (await rows_by_id(database_url)).get(task_id)
    return row is not None and row["status"] == status


async def _redeliveries(database_url: str, task_id: uuid.UUID) -> int:
    count: int = (await rows_by_id(database_url))[task_id]["redeliveries"]
    return count


async def _redeliveries_above(database_url: str, task_id: uuid.UUID, seen: int) -> bool:
    return await _redeliveries(database_url, task_id) > seen


async def _depth_at_least(broker: Broker, queue: str, count: int) -> bool:
    return await broker.queue_depth(queue) >= count


async def _settled(broker: Broker, held: Callable[[], int]) -> bool:
    return held() == 0 and await broker.queue_depth(QUEUE_REALTIME) == 0
