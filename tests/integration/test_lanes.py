"""Lane behaviour on the real broker: backpressure, drop-head into the intake, expiry, retry levels."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest

from shared import admin
from shared.broker.aio import Broker, Delivery
from shared.errors import PublishNackedError
from shared.management import Management
from shared.schema import Envelope, Task
from shared.settings import AdminSettings
from shared.topology import (
    EXCHANGE_FRAMES,
    QUEUE_BULK,
    QUEUE_INTAKE,
    QUEUE_REALTIME,
    QUEUE_RETRY_READY,
    Topology,
)
from tests.support.broker import override_policy


def frame(lane: str = "bulk", camera: str = "cam-1") -> Envelope:
    task = Task(
        task_id=uuid.uuid4(),
        lane=lane,
        site="site-a",
        camera_id=camera,
        captured_at=datetime.now(UTC),
        trace_id="t-" + uuid.uuid4().hex[:8],
    )
    return task.to_envelope(b"\xff\xd8\xff frame")


async def collect(broker: Broker, queue: str, count: int, timeout: float = 20.0) -> list[Delivery]:
    """The first ``count`` deliveries from ``queue``, acked, or a timeout failure."""
    received: list[Delivery] = []
    done = asyncio.Event()

    async def on_delivery(delivery: Delivery) -> None:
        received.append(delivery)
        await delivery.ack()
        if len(received) >= count:
            done.set()

    subscription = await broker.consume(queue, on_delivery, prefetch=count)
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        await subscription.cancel()
        await subscription.close()
    return received


async def test_a_full_bulk_lane_nacks_the_publisher(
    broker: Broker, management: Management, topology_settings: AdminSettings
) -> None:
    await override_policy(management, topology_settings, QUEUE_BULK, **{"max-length": 2})
    await broker.publish(frame(), EXCHANGE_FRAMES)
    await broker.publish(frame(), EXCHANGE_FRAMES)

    with pytest.raises(PublishNackedError, match="refused"):
        await broker.publish(frame(), EXCHANGE_FRAMES)

    assert await broker.queue_depth(QUEUE_BULK) == 2
    assert await broker.queue_depth(QUEUE_INTAKE) == 0


async def test_a_full_realtime_lane_pushes_its_oldest_into_the_intake(
    broker: Broker, management: Management, topology_settings: AdminSettings
) -> None:
    await override_policy(management, topology_settings, QUEUE_REALTIME, **{"max-length": 2})
    sent = [frame("realtime") for _ in range(5)]
    for envelope in sent:
        await broker.publish(envelope, EXCHANGE_FRAMES)

    pushed_out = await collect(broker, QUEUE_INTAKE, 3)

    assert [d.envelope.message_id for d in pushed_out] == [e.message_id for e in sent[:3]]
    death = pushed_out[0].envelope.headers["x-death"][0]
    assert (death["reason"], death["queue"]) == ("maxlen", QUEUE_REALTIME)
    assert await broker.queue_depth(QUEUE_REALTIME) == 2


@pytest.mark.parametrize("queue", [QUEUE_REALTIME, QUEUE_BULK])
async def test_an_expired_frame_reaches_the_intake_with_its_x_death(
    broker: Broker, management: Management, topology_settings: AdminSettings, queue: str
) -> None:
    await override_policy(management, topology_settings, queue, **{"message-ttl": 100})
    envelope = frame("realtime" if queue == QUEUE_REALTIME else "bulk")
    await broker.publish(envelope, EXCHANGE_FRAMES)

    [expired] = await collect(broker, QUEUE_INTAKE, 1)

    assert expired.envelope.message_id == envelope.message_id
    assert expired.envelope.routing_key == envelope.routing_key
    death = expired.envelope.headers["x-death"][0]
    assert (death["reason"], death["queue"], death["exchange"]) == ("expired", queue, EXCHANGE_FRAMES)


@pytest.fixture
async def fast_retry_settings(admin_settings: AdminSettings) -> AdminSettings:
    settings = admin_settings.model_copy(update={"retry_delays_ms": (300, 1000)})
    await admin.apply_topology(settings)
    return settings


async def test_a_retry_comes_back_to_retry_ready_with_its_routing_key(
    fast_retry_settings: AdminSettings,
) -> None:
    topology = Topology.from_settings(fast_retry_settings)
    broker = await Broker.connect(fast_retry_settings.amqp_url, "test:retry")
    try:
        envelope = frame("bulk", camera="cam-9")
        level = topology.retry_level_for(2)
        started = asyncio.get_running_loop().time()
        await broker.publish(envelope.republished(**{"x-detfleet-attempt": 2}), level)

        [back] = await collect(broker, QUEUE_RETRY_READY, 1)
        waited = asyncio.get_running_loop().time() - started
    finally:
        await broker.close()

    assert level == "detfleet.retry.300ms"
    assert back.envelope.routing_key == "bulk.site-a.cam-9"
    assert back.envelope.headers["x-detfleet-attempt"] == 2
    assert back.envelope.headers["x-death"][0]["reason"] == "expired"
    assert waited >= 0.25  # it did wait out the level's delay
