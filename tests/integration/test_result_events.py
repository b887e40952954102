"""Result events against the real RabbitMQ and Postgres: one event per committed row, routed by status,
site and camera; announced again after a crash between the commit and the publish; and nothing acked while
the results exchange is gone (docs/results.md)."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from consumer.detector.fake import FakeDetector
from consumer.worker import Worker
from shared.broker.aio import Broker, Delivery
from shared.events import ResultEvent
from shared.management import Management
from shared.settings import AdminSettings
from shared.topology import EXCHANGE_RESULTS, QUEUE_BULK
from tests.integration.consumer_support import (
    RUN_TIMEOUT_S,
    consumer_settings,
    jpeg,
    make_task,
    publish,
    row_count,
    rows_by_id,
    run_until_idle,
    running,
)
from tests.integration.test_consumer_core import CORRUPT_JPEG
from tests.integration.test_consumer_faults import assert_queues_empty, consumer_env, eventually, read_log
from tests.support.crashing_consumer import CRASH_EXIT_CODE


class Subscriber:
    """Every event one binding receives, in arrival order; ``wait_for`` awaits a count, never a sleep."""

    def __init__(self) -> None:
        self.events: list[tuple[str, ResultEvent]] = []
        self._arrived = asyncio.Condition()

    async def handle(self, delivery: Delivery) -> None:
        event = ResultEvent.from_json(delivery.envelope.body)
        await delivery.ack()
        async with self._arrived:
            self.events.append((delivery.envelope.routing_key, event))
            self._arrived.notify_all()

    async def wait_for(self, count: int) -> None:
        async def enough() -> None:
            async with self._arrived:
                await self._arrived.wait_for(lambda: len(self.events) >= count)

        await asyncio.wait_for(enough(), RUN_TIMEOUT_S)

    def per_task(self) -> Counter[uuid.UUID]:
        return Counter(event.task_id for _, event in self.events)


@asynccontextmanager
async def subscribed(broker: Broker, *keys: str) -> AsyncIterator[Subscriber]:
    subscriber = Subscriber()
    subscription = await broker.subscribe(EXCHANGE_RESULTS, keys, subscriber.handle)
    try:
        yield subscriber
    finally:
        await subscription.close()


async def test_each_row_gets_one_event_with_its_contents_and_a_failures_binding_sees_only_failures(
    broker: Broker, topology_settings: AdminSettings, results_db: str
) -> None:
    good = [make_task(camera=f"cam-{i % 3}") for i in range(12)]
    bad = [make_task(camera="cam-9") for _ in range(3)]
    async with subscribed(broker, "#") as everything, subscribed(broker, "failed.#") as failures:
        for task in good:
            await publish(broker, task, jpeg(1))
        for task in bad:
            await publish(broker, task, CORRUPT_JPEG)
        await run_until_idle(consumer_settings(topology_settings, results_db), FakeDetector())
        await everything.wait_for(len(good) + len(bad))
        await failures.wait_for(len(bad))

    rows = await rows_by_id(results_db)
    assert set(everything.per_task()) == set(rows)
    assert set(everything.per_task().values()) == {1}
    for key, event in everything.events:
        row = rows[event.task_id]
        assert key == f"{row['status']}.site-a.{row['camera_id']}"
        assert (event.status, event.reason, event.camera_id, event.lane) == (
            row["status"],
            row["reason"],
            row["camera_id"],
            row["lane"],
        )
        assert event.detections == (json.loads(row["detections"]) if row["detections"] else None)
        assert event.model_sha256 == row["model_sha256"]
        assert event.trace_id == row["trace_id"]
        assert event.completed_at == row["completed_at"]
    assert {e.task_id for _, e in failures.events} == {t.task_id for t in bad}
    assert all(key.startswith("failed.") for key, _ in failures.events)
    # One replica announces a camera's results in the order its rows committed.
    by_camera: dict[str | None, list[ResultEvent]] = defaultdict(list)
    for _, event in everything.events:
        by_camera[event.camera_id].append(event)
    for events in by_camera.values():
        assert [e.completed_at for e in events] == sorted(e.completed_at for e in events)


async def test_a_consumer_killed_between_commit_and_announce_leaves_every_task_announced_once_in_rows(
    broker: Broker, topology_settings: AdminSettings, results_db: str, tmp_path: Path
) -> None:
    tasks = [make_task(camera=f"cam-{i % 2}") for i in range(24)]
    log = tmp_path / "dying.log"
    async with subscribed(broker, "#") as subscriber:
        for task in tasks:
            await publish(broker, task, jpeg(2))
        env = consumer_env(topology_settings.amqp_url, results_db, max_batch="8", max_wait_ms="50")
        with log.open("ab") as output:
            victim = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.support.dying_consumer", env=env, stdout=output, stderr=output
            )
        code = await asyncio.wait_for(victim.wait(), RUN_TIMEOUT_S)
        assert code == CRASH_EXIT_CODE, await read_log(log)
        committed_unannounced = await row_count(results_db)
        assert 0 < committed_unannounced < len(tasks)
        assert subscriber.events == []

        await run_until_idle(consumer_settings(topology_settings, results_db), FakeDetector())
        await subscriber.wait_for(len(tasks))

    assert set(subscriber.per_task()) == {t.task_id for t in tasks}  # at least one event each
    rows = await rows_by_id(results_db)
    assert await row_count(results_db) == len(tasks)  # and no row twice
    assert sum(r["redeliveries"] for r in rows.values()) == committed_unannounced
    await assert_queues_empty(broker, QUEUE_BULK)


async def test_while_the_results_exchange_is_gone_nothing_is_acked_and_every_event_follows_its_return(
    broker: Broker, topology_settings: AdminSettings, results_db: str, management: Management, vhost: str
) -> None:
    tasks = [make_task() for _ in range(10)]
    subscriber = Subscriber()  # a durable queue of its own: it outlives the exchange and its binding
    subscription = await broker.subscribe(EXCHANGE_RESULTS, ["#"], subscriber.handle, queue=WATCH_QUEUE)
    await management.request("DELETE", f"/exchanges/{vhost}/{EXCHANGE_RESULTS}")
    for task in tasks:
        await publish(broker, task, jpeg(3))

    settings = consumer_settings(topology_settings, results_db, exit_when_idle_s=None)
    async with running(settings, FakeDetector()) as worker:
        await eventually(lambda: _paused(worker), "the worker paused for the missing exchange")
        await eventually(lambda: _ready(broker, len(tasks)), "every message back in its queue, none acked")
        assert await row_count(results_db) > 0  # rows commit; only the acks wait for their events

        # The exchange and the watcher's binding come back in one definitions import, before any event.
        await management.load_definitions(vhost, _results_exchange_bound_to(WATCH_QUEUE))
        await subscriber.wait_for(len(tasks))
        await eventually(lambda: _ready(broker, 0), "every message acked once its event was confirmed")
    await subscription.close()
    assert set(subscriber.per_task()) == {t.task_id for t in tasks}
    assert await row_count(results_db) == len(tasks)


WATCH_QUEUE = "test.results-watch"


def _results_exchange_bound_to(queue: str) -> dict[str, Any]:
    exchange = {"name": EXCHANGE_RESULTS, "type": "topic", "durable": True, "auto_delete": False}
    binding = {"source": EXCHANGE_RESULTS, "destination": queue, "destination_type": "queue"}
    return {
        "exchanges": [{**exchange, "internal": False, "arguments": {}}],
        "bindings": [{**binding, "routing_key": "#", "arguments": {}}],
    }


async def _paused(worker: Worker) -> bool:
    return worker.connection.paused


async def _ready(broker: Broker, count: int) -> bool:
    return await broker.queue_depth(QUEUE_BULK) == count
