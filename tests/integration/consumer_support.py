"""Running a worker in-process against the real broker and database, and publishing frames to it."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import cv2
import numpy as np

from consumer.detector.base import Detector
from consumer.sink import Sink
from consumer.worker import Worker
from shared.broker.aio import Broker
from shared.schema import Envelope, Task
from shared.settings import AdminSettings, ConsumerSettings
from shared.topology import EXCHANGE_FRAMES, QUEUE_DLQ

RUN_TIMEOUT_S = 60  # a bound against hangs, not a timing assertion


def jpeg(seed: int = 0, width: int = 160, height: int = 120) -> bytes:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    ok, data = cv2.imencode(".jpg", image)
    assert ok
    return bytes(data)


def white_jpeg(width: int = 160, height: int = 120) -> bytes:
    """A frame unlike any :func:`jpeg` frame: a fake detector can be told to fail on exactly this one."""
    ok, data = cv2.imencode(".jpg", np.full((height, width, 3), 255, np.uint8))
    assert ok
    return bytes(data)


def make_task(lane: str = "bulk", camera: str = "cam-1", **changes: Any) -> Task:
    fields: dict[str, Any] = {
        "task_id": uuid.uuid4(),
        "lane": lane,
        "site": "site-a",
        "camera_id": camera,
        "captured_at": datetime.now(UTC),
        "trace_id": "trace-" + uuid.uuid4().hex[:8],
        "producer": "test",
    }
    if lane == "realtime":
        fields["deadline"] = fields["captured_at"] + timedelta(seconds=60)
    return Task(**{**fields, **changes})


def consumer_settings(admin: AdminSettings, database_url: str, **changes: Any) -> ConsumerSettings:
    values: dict[str, Any] = {
        "amqp_url": admin.amqp_url,
        "database_url": database_url,
        "health_port": 0,
        "max_batch": 8,
        "max_wait_ms": 50,
        "exit_when_idle_s": 0.5,
        "retry_delays_ms": admin.retry_delays_ms,
        "consumer_id": "test-worker",
        "log_json": False,
    }
    return ConsumerSettings(**{**values, **changes})


async def publish(broker: Broker, task: Task, body: bytes) -> Envelope:
    envelope = task.to_envelope(body)
    await broker.publish(envelope, EXCHANGE_FRAMES)
    return envelope


async def run_until_idle(settings: ConsumerSettings, detector: Detector) -> Worker:
    """Run a worker until it exits by itself (``exit_when_idle_s``): every queue empty, nothing held."""
    worker = Worker(settings, detector)
    code = await asyncio.wait_for(worker.run(), RUN_TIMEOUT_S)
    assert code == 0
    return worker


@contextlib.asynccontextmanager
async def running(settings: ConsumerSettings, detector: Detector) -> AsyncIterator[Worker]:
    worker = Worker(settings, detector)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.request_stop("test done")
        await asyncio.wait_for(task, RUN_TIMEOUT_S)


async def rows_by_id(database_url: str) -> dict[uuid.UUID, dict[str, Any]]:
    sink = await Sink.open(database_url)
    try:
        return {r["task_id"]: r for r in await sink.fetch_rows()}
    finally:
        await sink.close()


async def drain_queue(broker: Broker, queue: str = QUEUE_DLQ) -> list[Envelope]:
    """Every message now in ``queue`` (acked)."""
    found = []
    async with broker.reading(queue) as reader:
        while (delivery := await reader.get(timeout=2)) is not None:
            found.append(delivery.envelope)
            await delivery.ack()
    return found


async def row_count(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM detfleet_results")
        return count
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def consumer_process(
    model: Path, env: dict[str, str], log: Path, *args: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``detfleet consume`` in a subprocess logging to ``log``; killed on the way out if still running."""
    with log.open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "detfleet",
            "consume",
            "--model",
            str(model),
            *args,
            env=env,
            stdout=output,
            stderr=output,
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
