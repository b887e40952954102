"""Result events and rows for the subscriber tests, and ``detfleet results`` as a subprocess.

Until the consumer publishes events itself, the tests publish them as it will: ``ResultEvent(...)``
through the real broker to ``detfleet.results``, and insert the matching rows into a migrated database.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg

from shared.broker.aio import Broker, Delivery, Subscription
from shared.events import ResultEvent
from shared.topology import EXCHANGE_RESULTS

BOUND_S = 60  # against a hang, far above what any step here takes


def make_event(
    status: str = "ok",
    site: str = "line-1",
    camera: str = "cam-1",
    age: timedelta = timedelta(0),
    **fields: object,
) -> ResultEvent:
    completed = datetime.now(UTC) - age
    values: dict[str, object] = {
        "task_id": uuid.uuid4(),
        "status": status,
        "site": site,
        "camera_id": camera,
        "lane": "bulk",
        "captured_at": completed - timedelta(milliseconds=400),
        "completed_at": completed,
        "detections": [{"class_id": 2, "label": "scratch", "score": 0.91, "box": [10.0, 20.0, 60.0, 80.0]}]
        if status == "ok"
        else None,
        "reason": None if status == "ok" else f"{status}: a reason",
        "model_name": "detfleet-line-320.onnx",
        "model_sha256": "ab" * 32,
        "end_to_end_ms": 412.5,
        "trace_id": uuid.uuid4().hex,
        "attempt": 1,
    }
    return ResultEvent.model_validate(values | fields)


_INSERT = """
INSERT INTO detfleet_results (task_id, camera_id, site, lane, captured_at, received_at, completed_at, status,
    reason, attempt, consumer_id, model_name, model_sha256, end_to_end_ms, detections, trace_id)
VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8, $9, 'test', $10, $11, $12, $13::jsonb, $14)
"""


async def insert_rows(database_url: str, events: Sequence[ResultEvent]) -> None:
    """The rows these events stand for, as the consumer's sink writes them."""
    conn = await asyncpg.connect(database_url)
    try:
        for e in events:
            detections = None if e.detections is None else json.dumps(e.detections)
            await conn.execute(
                _INSERT, e.task_id, e.camera_id, e.site, e.lane, e.captured_at, e.completed_at, e.status,
                e.reason, e.attempt, e.model_name, e.model_sha256, e.end_to_end_ms, detections, e.trace_id,
            )  # fmt: skip
    finally:
        await conn.close()


async def publish_events(broker: Broker, events: Sequence[ResultEvent]) -> None:
    for event in events:
        await broker.publish(event.to_envelope(), EXCHANGE_RESULTS)


@dataclass
class Collector:
    """A subscriber of our own: every event its temporary queue gets, and a wait for a count of them."""

    events: list[ResultEvent] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, delivery: Delivery) -> None:
        self.events.append(ResultEvent.from_json(delivery.envelope.body))
        self.deliveries.append(delivery)
        await delivery.ack()
        self._changed.set()

    async def wait_for(self, count: int) -> list[ResultEvent]:
        async def reached() -> None:
            while len(self.events) < count:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(reached(), BOUND_S)
        return self.events


async def collect(broker: Broker, exchange: str, keys: Sequence[str]) -> tuple[Collector, Subscription]:
    collector = Collector()
    subscription = await broker.subscribe(exchange, keys, collector.handle, queue=None)
    return collector, subscription


def cli_env(amqp_url: str, database_url: str | None = None, **extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DETFLEET_")}
    env = clean | {"DETFLEET_AMQP_URL": amqp_url, "DETFLEET_LOG_LEVEL": "WARNING"}
    if database_url is not None:
        env["DETFLEET_DATABASE_URL"] = database_url
    return env | extra


async def start_cli(env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "detfleet", "results", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def run_cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await start_cli(env, *args)
    out, err = await asyncio.wait_for(process.communicate(), BOUND_S)
    return process.returncode or 0, out.decode(), err.decode()


async def wait_until_subscribed(process: asyncio.subprocess.Process) -> list[str]:
    """Read stderr up to the line saying the queue is bound; the lines before it (logs)."""
    assert process.stderr is not None
    before: list[str] = []
    while True:
        line = (await asyncio.wait_for(process.stderr.readline(), BOUND_S)).decode()
        assert line, f"exited before subscribing: {before}"
        if line.startswith("subscribed"):
            return before
        before.append(line)
