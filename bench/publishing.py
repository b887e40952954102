"""Publishing the bench frames: a backlog as fast as confirms allow, or paced at a rate (open loop).

Every message carries its publish time as the capture time, so a row's completed_at - captured_at is the
end-to-end latency from publish to committed row, for every peer alike.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import aio_pika

from shared.schema import Lane, Task
from shared.topology import EXCHANGE_FRAMES

SITE, CAMERA = "bench", "cam-1"
IN_FLIGHT = 256  # unconfirmed publishes at once, as detfleet produce's default
PLAIN_QUEUE = "bench.frames"  # the seed-style peer's and the broker ceiling's queue

MessageFor = Callable[[bytes], aio_pika.Message]


def schedule(count: int, rate: float | None) -> list[float]:
    """Offsets in seconds from the start at which each publish is due: all at 0 for a backlog."""
    if rate is None:
        return [0.0] * count
    return [index / rate for index in range(count)]


def camera_name(index: int, cameras: int) -> str:
    """``cam-1`` for a single camera (the bench's usual key), ``cam-0001``... for many."""
    return CAMERA if cameras == 1 else f"cam-{index % cameras:04d}"


def detfleet_message(body: bytes, lane: Lane = "bulk", camera: str = CAMERA) -> aio_pika.Message:
    """A task exactly as detfleet's publisher builds it, captured now."""
    now = datetime.now(UTC)
    task = Task(
        task_id=uuid.uuid4(),
        lane=lane,
        site=SITE,
        camera_id=camera,
        captured_at=now,
        trace_id=uuid.uuid4().hex,
        producer="bench",
    )
    return aio_pika.Message(
        body,
        headers=task.headers(),
        message_id=str(task.task_id),
        timestamp=now,
        app_id="bench",
        content_type="image/jpeg",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def plain_message(body: bytes) -> aio_pika.Message:
    """The same body as a plain persistent message: a task id and the capture time, nothing else."""
    return aio_pika.Message(
        body,
        headers={"captured_at": datetime.now(UTC).isoformat()},
        message_id=str(uuid.uuid4()),
        content_type="image/jpeg",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def publish(
    amqp_url: str,
    bodies: Sequence[bytes],
    count: int,
    *,
    rate: float | None = None,
    detfleet: bool = True,
    lane: Lane = "bulk",
    cameras: int = 1,
) -> float:
    """Publish ``count`` frames (cycling ``bodies``) with confirms, at most IN_FLIGHT unconfirmed, either to
    detfleet's ``lane`` (frame i from camera i mod ``cameras``, each its own routing key) or to PLAIN_QUEUE
    (declared here); returns the confirmed publishes per second."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        if detfleet:
            exchange = await channel.get_exchange(EXCHANGE_FRAMES)
        else:
            await channel.declare_queue(PLAIN_QUEUE, durable=True)
            exchange = channel.default_exchange

        def addressed(index: int, body: bytes) -> tuple[aio_pika.Message, str]:
            if not detfleet:
                return plain_message(body), PLAIN_QUEUE
            camera = camera_name(index, cameras)
            return detfleet_message(body, lane, camera), f"{lane}.{SITE}.{camera}"

        window = asyncio.Semaphore(IN_FLIGHT)

        async def one(index: int, body: bytes) -> None:
            try:
                message, routing_key = addressed(index, body)
                await exchange.publish(message, routing_key)
            finally:
                window.release()

        started = time.monotonic()
        tasks = []
        for index, due in enumerate(schedule(count, rate)):
            delay = started + due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await window.acquire()
            tasks.append(asyncio.create_task(one(index, bodies[index % len(bodies)])))
        await asyncio.gather(*tasks)
        return count / (time.monotonic() - started)
    finally:
        await connection.close()
