"""``DETFLEET_QUEUE_TYPE=quorum`` on a real node: every queue is a quorum queue, the policies that move
messages on ask for at-least-once dead-lettering, and a retry level still hands its tasks back."""

from __future__ import annotations

import asyncio
import time

import pytest

from shared import admin
from shared.broker.aio import Broker, Delivery
from shared.management import Management
from shared.settings import AdminSettings
from shared.topology import QUEUE_RETRY_READY, Topology, vhost_of
from tests.integration.consumer_support import make_task
from tests.support.broker import read_all
from tests.support.fakes import TINY_JPEG

pytestmark = pytest.mark.integration

STATS_LIMIT_S = 30.0  # a bound against a hang; the management API refreshes its figures every 5 s


@pytest.fixture
async def quorum_settings(admin_settings: AdminSettings) -> AdminSettings:
    settings = admin_settings.model_copy(update={"queue_type": "quorum", "retry_delays_ms": (200,)})
    await admin.apply_topology(settings)
    return settings


async def effective(management: Management, vhost: str, queue: str, key: str) -> object:
    """``key`` of the policy in effect on ``queue`` once the management API shows one (its figures are
    collected every few seconds, so a policy set just now shows a little later)."""
    deadline = time.monotonic() + STATS_LIMIT_S
    while not (definition := (await management.queue(vhost, queue)).get("effective_policy_definition")):
        assert time.monotonic() < deadline, f"no policy shown on {queue} after {STATS_LIMIT_S:g} s"
        await asyncio.sleep(0.5)
    return definition.get(key)


async def test_every_queue_is_quorum_and_dead_letters_at_least_once_but_realtime(
    management: Management, quorum_settings: AdminSettings
) -> None:
    vhost = vhost_of(quorum_settings.amqp_url)
    queues = {q["name"]: q for q in await management.queues(vhost)}
    expected = Topology.from_settings(quorum_settings).queues
    assert {q.name for q in expected} == set(queues)
    for spec in expected:
        assert queues[spec.name]["type"] == "quorum"
        assert queues[spec.name]["arguments"]["x-quorum-initial-group-size"] == 3
    strategy = {
        name: await effective(management, vhost, name, "dead-letter-strategy")
        for name in ("detfleet.bulk", "detfleet.retry.200ms", "detfleet.realtime")
    }
    assert strategy["detfleet.bulk"] == strategy["detfleet.retry.200ms"] == "at-least-once"
    assert strategy["detfleet.realtime"] is None  # drop-head: at most once (docs/disaster-recovery.md)


async def test_a_quorum_retry_level_hands_its_task_back_after_the_delay(
    management: Management, quorum_settings: AdminSettings
) -> None:
    # A quorum queue takes a new policy some seconds after it is set: publish once its TTL is in effect.
    level = "detfleet.retry.200ms"
    assert await effective(management, vhost_of(quorum_settings.amqp_url), level, "message-ttl") == 200
    broker = await Broker.connect(quorum_settings.amqp_url, "test:quorum-retry", robust=False)
    try:
        envelope = make_task().to_envelope(TINY_JPEG)
        await broker.publish(envelope, "detfleet.retry.200ms")
        returned: list[Delivery] = []
        deadline = time.monotonic() + STATS_LIMIT_S  # a bound against a hang: the TTL is 200 ms
        while not returned and time.monotonic() < deadline:
            returned = await read_all(broker, QUEUE_RETRY_READY)
        assert [d.envelope.message_id for d in returned] == [envelope.message_id]
    finally:
        await broker.close()
