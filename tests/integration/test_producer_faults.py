"""The publisher when the path to the broker breaks: a TCP proxy the test owns cuts or stalls it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from producer.metrics import ProducerMetrics
from producer.publisher import AsyncPublisher, FrameDroppedError
from shared.broker.aio import Broker
from shared.errors import PublishTimeoutError
from shared.settings import AdminSettings, ProducerSettings
from shared.topology import QUEUE_BULK, QUEUE_REALTIME
from tests.support.broker import read_all, wait_until
from tests.support.frames import jpeg_bytes
from tests.support.proxy import TcpProxy

pytestmark = pytest.mark.integration

FRAME = jpeg_bytes(seed=3)


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    async with TcpProxy(port=5672) as running:
        yield running


def through(proxy: TcpProxy, topology: AdminSettings, **changes: Any) -> ProducerSettings:
    return ProducerSettings(amqp_url=proxy.amqp_url(topology.amqp_url), **changes)


async def test_frames_in_flight_when_the_connection_dies_are_resent_and_confirmed(
    topology_settings: AdminSettings, broker: Broker, proxy: TcpProxy
) -> None:
    metrics = ProducerMetrics()
    async with AsyncPublisher(through(proxy, topology_settings), metrics=metrics) as publisher:
        before = [await publisher.publish(FRAME, camera="cam-1", site="site-a") for _ in range(5)]
        proxy.pause()
        stuck = [await publisher.submit(FRAME, camera="cam-1", site="site-a") for _ in range(10)]
        await wait_until(lambda: publisher.in_flight == 10)

        assert proxy.cut() == 1
        proxy.resume()
        after = await asyncio.wait_for(asyncio.gather(*stuck), 30)

    assert proxy.accepted == 2
    assert metrics.counts()["resent"] == 10
    ids = [d.envelope.message_id for d in await read_all(broker, QUEUE_BULK)]
    assert ids == [str(i) for i in before + after]


async def test_a_connection_cut_mid_stream_loses_no_confirmed_frame(
    topology_settings: AdminSettings, broker: Broker, proxy: TcpProxy
) -> None:
    metrics = ProducerMetrics()
    futures: list[asyncio.Future[uuid.UUID]] = []
    async with AsyncPublisher(
        through(proxy, topology_settings, max_in_flight=32), metrics=metrics
    ) as publisher:
        for index in range(400):
            futures.append(await publisher.submit(FRAME, camera="cam-1", site="site-a"))
            if index == 200:
                await wait_until(lambda: metrics.counts()["confirmed"] >= 50)
                proxy.cut()
        outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 60)

    confirmed = {str(o) for o in outcomes if isinstance(o, uuid.UUID)}
    assert len(confirmed) == 400, [o for o in outcomes if not isinstance(o, uuid.UUID)][:3]
    assert proxy.accepted >= 2
    in_queue = [d.envelope.message_id for d in await read_all(broker, QUEUE_BULK)]
    # Duplicates are allowed (a confirm lost with the connection means a resend); losses are not.
    assert confirmed <= set(in_queue)
    assert len(in_queue) == 400 + len(in_queue) - len(set(in_queue))


async def test_a_blocked_broker_times_bulk_out_and_drops_the_oldest_realtime_frames(
    topology_settings: AdminSettings, broker: Broker, proxy: TcpProxy
) -> None:
    settings = through(
        proxy, topology_settings, max_in_flight=2, bulk_buffer=3, realtime_buffer=2, bulk_block_timeout_s=0.5
    )
    metrics = ProducerMetrics()
    async with AsyncPublisher(settings, metrics=metrics) as publisher:
        warm = await publisher.publish(FRAME, camera="cam-1", site="site-a")
        # Stand-in for a memory alarm: the broker stops reading, publishes hang without a nack.
        proxy.pause()
        bulk = [await publisher.submit(FRAME, camera="cam-1", site="site-a") for _ in range(5)]
        await wait_until(lambda: publisher.in_flight == 2)

        with pytest.raises(PublishTimeoutError, match=r"bulk buffer full \(3 frames\) for 0.5 s"):
            await publisher.submit(FRAME, camera="cam-1", site="site-a")
        with pytest.raises(PublishTimeoutError, match="no confirm within 0.1 s"):
            await publisher.publish(FRAME, camera="cam-2", site="site-a", lane="realtime", timeout=0.1)
        realtime = [
            await publisher.submit(FRAME, camera="cam-2", site="site-a", lane="realtime") for _ in range(4)
        ]

        # The timed-out realtime frame stayed queued: with it, five frames met a buffer of two.
        assert all(f.done() and isinstance(f.exception(), FrameDroppedError) for f in realtime[:2])
        assert not any(f.done() for f in realtime[2:])
        assert metrics.counts()["dropped"] == 3
        assert metrics.counts()["buffered"] == 5

        proxy.resume()
        bulk_ids = await asyncio.wait_for(asyncio.gather(*bulk), 30)
        kept = [str(await asyncio.wait_for(f, 30)) for f in realtime[2:]]

    assert metrics.blocked_seconds >= 0.5
    assert [d.envelope.message_id for d in await read_all(broker, QUEUE_BULK)] == [str(warm)] + [
        str(i) for i in bulk_ids
    ]
    assert [d.envelope.message_id for d in await read_all(broker, QUEUE_REALTIME)] == kept
