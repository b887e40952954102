"""Prototypes of per-message savings in the consumer, measured here before any change is made there.

- reduced-scale decode, now done (consumer/decode.py): the figures of bench/decode_scale.py's decode and
  letterbox part, kept here so ``make bench`` reports them beside the others;
- the sink: one ``INSERT ... SELECT unnest(...) ON CONFLICT`` per batch (what consumer/sink.py does) against
  COPY into a temporary table followed by the same upsert from it, and a bare COPY (no conflict handling,
  the floor);
- ack frames: consumer/acker.py acks with multiple=true over the lowest contiguous run of settled tags, but
  the worker settles a batch one job at a time and each ack() flushes at once, so with in-order batches the
  run is always one tag long: one basic.ack frame per message. Measured here: a consumer (prefetch 48)
  acking each message of a 16-message batch against one ack(multiple=true) for the batch, alternating.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import aio_pika

from bench.common import BenchEnv, ResourceSampler
from bench.decode_scale import decode_letterbox
from bench.publishing import PLAIN_QUEUE, publish
from consumer.sink import _UPSERT, COLUMNS, ResultRow, _columns
from shared import db
from shared.settings import DEFAULT_DATABASE_URL

CANVAS = (320, 320)  # the shipped model's input


def reduced_decode(bodies: Sequence[bytes], rounds: int) -> dict[str, Any]:
    """Decode + letterbox into the shipped model's input, one thread, per frame: before and after."""
    return decode_letterbox(bodies, CANVAS, rounds)


_COPY_UPSERT = f"""
INSERT INTO detfleet_results ({", ".join(COLUMNS)})
SELECT {", ".join(COLUMNS)} FROM bench_incoming
ON CONFLICT (task_id) DO NOTHING
"""


def _rows(count: int) -> list[ResultRow]:
    now = datetime.now(UTC)
    detections = [{"class_id": 0, "label": "part", "score": 0.9, "box": [1.0, 2.0, 30.0, 40.0]}]
    template = ResultRow(
        task_id=uuid.uuid4(), camera_id="cam-1", site="bench", lane="bulk", captured_at=now, received_at=now,
        completed_at=now, status="ok", reason=None, attempt=1, consumer_id="bench", model_name="m.onnx",
        model_sha256="0" * 64, provider="CPUExecutionProvider", queue_wait_ms=1.0, decode_ms=1.0,
        inference_ms=1.0, sink_ms=1.0, end_to_end_ms=1.0, image_width=640, image_height=480,
        detections=detections, trace_id="t",
    )  # fmt: skip
    return [replace(template, task_id=uuid.uuid4()) for _ in range(count)]


async def sink_statements(batch: int, batches: int) -> dict[str, Any]:
    """Milliseconds per batch of ``batch`` rows for each way of writing it, in a throw-away database."""
    url = DEFAULT_DATABASE_URL.rsplit("/", 1)[0] + "/detfleet_bench_sink_" + uuid.uuid4().hex[:8]
    await db.migrate(url)
    conn = await db.connect(url)
    try:
        timings: dict[str, float] = {}
        for name in ("unnest_upsert", "copy_then_upsert", "bare_copy"):
            started = time.perf_counter()
            for _ in range(batches):
                rows = _rows(batch)
                async with conn.transaction():
                    if name == "unnest_upsert":
                        await conn.fetch(_UPSERT, *_columns(rows))
                    else:
                        records = list(zip(*_columns(rows), strict=True))
                        await _copy(conn, name, records)
            timings[name] = round((time.perf_counter() - started) * 1000 / batches, 3)
    finally:
        await conn.close()
        await db.drop_database(url)
    return {"rows_per_batch": batch, "ms_per_batch": timings}


async def _copy(conn: Any, name: str, records: list[tuple[Any, ...]]) -> None:
    if name == "bare_copy":
        await conn.copy_records_to_table("detfleet_results", records=records, columns=list(COLUMNS))
        return
    await conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS bench_incoming (LIKE detfleet_results) ON COMMIT DELETE ROWS"
    )
    await conn.copy_records_to_table("bench_incoming", records=records, columns=list(COLUMNS))
    await conn.execute(_COPY_UPSERT)


ACK_BATCH = 16
ACK_PREFETCH = 48  # detfleet's bulk prefetch at max batch 16: 16 x (2 batches in flight + 1)


async def _consume_acking(amqp_url: str, count: int, per_message: bool) -> float:
    """Messages a second through a consumer that acks each batch of ACK_BATCH either message by message or
    with one multiple=true ack, doing no other work."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=ACK_PREFETCH)
        queue = await channel.declare_queue(PLAIN_QUEUE, durable=True)
        pending: list[aio_pika.abc.AbstractIncomingMessage] = []
        done = asyncio.Event()
        received = acked = 0
        started = time.monotonic()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal received, acked
            received += 1
            pending.append(message)
            if len(pending) == ACK_BATCH or received == count:
                batch = pending[:]
                pending.clear()
                if per_message:
                    for each in batch:
                        await each.ack()
                else:
                    await batch[-1].ack(multiple=True)
                acked += len(batch)  # callbacks overlap: done only once every ack went out
                if acked == count:
                    done.set()

        await queue.consume(on_message)
        await asyncio.wait_for(done.wait(), 300)
        return count / (time.monotonic() - started)
    finally:
        await connection.close()


async def ack_frames(bodies: Sequence[bytes], count: int, rounds: int) -> dict[str, Any]:
    env = await BenchEnv.create()
    figures: dict[str, list[float]] = {"ack_per_message": [], "ack_multiple_per_batch": []}
    broker_cpu: dict[str, list[float | None]] = {"ack_per_message": [], "ack_multiple_per_batch": []}
    try:
        for _ in range(rounds):
            for name in figures:
                await publish(env.amqp_url, bodies, count, detfleet=False)
                with ResourceSampler(list) as sampler:
                    rate = await _consume_acking(env.amqp_url, count, name == "ack_per_message")
                figures[name].append(round(rate, 1))
                broker_cpu[name].append(sampler.figures()["cpu_cores_broker"])
    finally:
        await env.close()
    return {
        "messages": count,
        "batch": ACK_BATCH,
        "prefetch": ACK_PREFETCH,
        "consume_per_s": figures,
        "broker_cpu_cores": broker_cpu,
        "multiple_over_per_message": round(
            sorted(figures["ack_multiple_per_batch"])[rounds // 2]
            / sorted(figures["ack_per_message"])[rounds // 2],
            3,
        ),
    }


async def run_all(bodies: Sequence[bytes], quick: bool) -> dict[str, Any]:
    return {
        "reduced_decode": reduced_decode(bodies[:20], 2 if quick else 10),
        "sink": await sink_statements(16, 30 if quick else 200),
        "ack_frames": await ack_frames(bodies, 1000 if quick else 3000, 1 if quick else 3),
    }
