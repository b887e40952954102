"""Bulk backpressure on the real broker: a full lane nacks, the publisher backs off a bounded number of
times and then raises; nothing is dropped silently."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from producer.metrics import ProducerMetrics
from producer.publisher import AsyncPublisher
from shared.broker.aio import Broker
from shared.errors import PublishNackedError
from shared.management import Management
from shared.settings import AdminSettings, ProducerSettings
from shared.topology import QUEUE_BULK
from tests.support.broker import override_policy, read_all, wait_until
from tests.support.frames import jpeg_bytes

pytestmark = pytest.mark.integration


def producer_settings(topology: AdminSettings, **changes: Any) -> ProducerSettings:
    return ProducerSettings(amqp_url=topology.amqp_url, nack_backoff_s=0.02, **changes)


async def test_a_full_bulk_lane_raises_after_bounded_retries_and_every_frame_has_an_outcome(
    topology_settings: AdminSettings, management: Management, broker: Broker
) -> None:
    await override_policy(management, topology_settings, QUEUE_BULK, **{"max-length": 2})
    metrics = ProducerMetrics()

    async with AsyncPublisher(
        producer_settings(topology_settings, nack_retries=2), metrics=metrics
    ) as publisher:
        futures = [
            await publisher.submit(jpeg_bytes(seed=i), camera="cam-1", site="site-a") for i in range(5)
        ]
        outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 30)

    confirmed = [o for o in outcomes if isinstance(o, uuid.UUID)]
    refused = [o for o in outcomes if isinstance(o, PublishNackedError)]
    assert (len(confirmed), len(refused)) == (2, 3)
    assert all("refused it 3 times" in str(error) and "pushing back" in str(error) for error in refused)
    assert metrics.counts()["published"] == 5
    assert (metrics.counts()["nacked"], metrics.counts()["dropped"]) == (9, 0)
    assert sorted(d.envelope.message_id or "" for d in await read_all(broker, QUEUE_BULK)) == sorted(
        str(c) for c in confirmed
    )


async def test_publish_raises_a_clear_error_when_the_lane_stays_full(
    topology_settings: AdminSettings, management: Management
) -> None:
    await override_policy(management, topology_settings, QUEUE_BULK, **{"max-length": 1})

    async with AsyncPublisher(producer_settings(topology_settings, nack_retries=3)) as publisher:
        await publisher.publish(jpeg_bytes(), camera="cam-1", site="site-a")
        with pytest.raises(PublishNackedError, match=r"refused it 4 times \(bulk queue full\?\)"):
            await publisher.publish(jpeg_bytes(), camera="cam-1", site="site-a")


async def test_a_nacked_frame_gets_in_once_the_lane_has_room_again(
    topology_settings: AdminSettings, management: Management, broker: Broker
) -> None:
    await override_policy(management, topology_settings, QUEUE_BULK, **{"max-length": 1})
    metrics = ProducerMetrics()
    settings = producer_settings(topology_settings, nack_retries=50)

    async with AsyncPublisher(settings, metrics=metrics) as publisher:
        first = await publisher.publish(jpeg_bytes(seed=1), camera="cam-1", site="site-a")
        second = await publisher.submit(jpeg_bytes(seed=2), camera="cam-1", site="site-a")
        await wait_until(lambda: metrics.counts()["nacked"] >= 1)
        assert [d.envelope.message_id for d in await read_all(broker, QUEUE_BULK)] == [str(first)]

        second_id = await asyncio.wait_for(second, 30)

    assert [d.envelope.message_id for d in await read_all(broker, QUEUE_BULK)] == [str(second_id)]
