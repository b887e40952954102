"""Broker-side helpers the integration tests share: read a queue, wait for a condition, override a policy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from shared.broker.aio import Broker, Delivery
from shared.management import Management
from shared.settings import TopologySettings
from shared.topology import PolicySpec, Topology, vhost_of


async def read_all(broker: Broker, queue: str) -> list[Delivery]:
    """Every message now in ``queue``, acked."""
    got: list[Delivery] = []
    async with broker.reading(queue) as reader:
        while (delivery := await reader.get(timeout=2)) is not None:
            got.append(delivery)
            await delivery.ack()
    return got


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """A bounded wait for a condition the code under test exposes no event for."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def override_policy(api: Management, settings: TopologySettings, queue: str, **changes: Any) -> None:
    """Replace one queue's policy, repeating every key of the real one (only one policy applies)."""
    policy = next(p for p in Topology.from_settings(settings).policies if p.queue == queue)
    vhost = vhost_of(settings.amqp_url)
    await api.set_policy(vhost, PolicySpec(policy.name, queue, {**policy.definition, **changes}))
