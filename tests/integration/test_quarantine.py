"""The crash loop of aiormq issue 186 on a real broker, and the quarantine sweep that ends it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pika
import pytest

from shared.broker.aio import Broker, ConnectionLoss, Delivery
from shared.broker.quarantine import QUARANTINE_HEADER, QuarantineReport, quarantine_undecodable
from shared.errors import BrokerUnavailableError
from shared.settings import AdminSettings
from shared.topology import EXCHANGE_FRAMES, EXCHANGE_RETRY_READY, QUEUE_BULK, QUEUE_RETRY_READY

pytestmark = pytest.mark.integration

NOT_UTF8 = b"\xff\xfe"
WAIT_S = 15.0


@dataclass(frozen=True)
class Outgoing:
    routing_key: str
    body: bytes
    properties: pika.BasicProperties


def good(index: int) -> Outgoing:
    return Outgoing(
        f"bulk.site-a.cam-{index}",
        f"good-{index}".encode(),
        pika.BasicProperties(
            message_id=f"good-{index}",
            app_id="gateway-1",
            timestamp=1_800_000_000,
            delivery_mode=2,
            headers={"site": "site-a", "camera_id": f"cam-{index}"},
        ),
    )


def malformed(name: str, **properties: Any) -> Outgoing:
    properties.setdefault("message_id", f"bad-{name}")
    headers = {"site": "site-a", "camera_id": f"bad-{name}", **properties.pop("headers", {})}
    return Outgoing(
        f"bulk.site-a.bad-{name}",
        f"bad-{name}".encode(),
        pika.BasicProperties(delivery_mode=2, headers=headers, **properties),
    )


# What aiormq cannot decode, in queue order, and the reason the sweep should give for each.
MALFORMED = (
    (
        malformed("timestamp", timestamp=2**62),
        "timestamp property is out of range (year 146140482 is out of range)",
    ),
    (malformed("app-id", app_id=NOT_UTF8), "app_id property is not UTF-8 text"),
    (malformed("message-id", message_id=NOT_UTF8), "message_id property is not UTF-8 text"),
    (malformed("header-name", headers={b"\xff": "x"}), "header '\\xff' is not UTF-8 text"),
)


class FarFutureTimestamp(datetime):
    """Encoded by pika as an 8-byte timestamp far beyond the year 9999, as a foreign client may send."""

    def utctimetuple(self) -> Any:
        return (1970, 1, 10**12, 0, 0, 0, 0, 0, 0)


def publish_with_pika(url: str, messages: Sequence[Outgoing]) -> None:
    """Publish through pika, which sends these properties as given, with confirms."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for message in messages:
            channel.basic_publish(
                EXCHANGE_FRAMES, message.routing_key, message.body, message.properties, mandatory=True
            )
    finally:
        connection.close()


def interleaved() -> tuple[list[Outgoing], list[Outgoing]]:
    """Good messages before, between and after the malformed ones: (everything in order, the good ones)."""
    goods = [good(i) for i in range(len(MALFORMED) + 1)]
    everything = [goods[0]]
    for (bad, _), next_good in zip(MALFORMED, goods[1:], strict=True):
        everything += [bad, next_good]
    return everything, goods


async def wait_for_depth(broker: Broker, queue: str, expected: int) -> None:
    """Until ``queue`` holds ``expected`` ready messages: the broker requeues a dead connection's later."""
    deadline = time.monotonic() + WAIT_S
    depth = await broker.queue_depth(queue)
    while depth != expected:
        assert time.monotonic() < deadline, f"{queue} holds {depth} messages, expected {expected}"
        await asyncio.sleep(0.05)
        depth = await broker.queue_depth(queue)


async def drain(broker: Broker, queue: str) -> list[Delivery]:
    """Every message in ``queue``, read and acked through aio-pika."""
    deliveries: list[Delivery] = []
    async with broker.reading(queue) as reader:
        while (delivery := await reader.get(timeout=5.0)) is not None:
            assert await delivery.ack()
            deliveries.append(delivery)
    return deliveries


async def consume_until_lost(url: str) -> ConnectionLoss:
    """Consume ``detfleet.bulk`` the way a worker does, without settling, until the connection dies."""
    consumer = await Broker.connect(url, "test:quarantine-victim", robust=False)
    lost: asyncio.Future[ConnectionLoss] = asyncio.get_running_loop().create_future()

    def closed(loss: ConnectionLoss) -> None:
        if not lost.done():
            lost.set_result(loss)

    consumer.on_close(closed)

    async def hold(_: Delivery) -> None:
        pass

    try:
        await consumer.consume(QUEUE_BULK, hold, prefetch=100)
        return await asyncio.wait_for(lost, WAIT_S)
    finally:
        await consumer.close()


async def test_sweep_moves_undecodable_messages_aside_and_ends_the_crash_loop(
    topology_settings: AdminSettings, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    url = topology_settings.amqp_url
    everything, goods = interleaved()
    await asyncio.to_thread(publish_with_pika, url, everything)

    # The hazard is real: aio-pika's connection dies on the first malformed message.
    loss = await consume_until_lost(url)
    assert loss.undecodable_frame, loss.reason
    await wait_for_depth(broker, QUEUE_BULK, len(everything))

    with caplog.at_level(logging.WARNING, logger="shared.broker.quarantine"):
        report = await asyncio.to_thread(quarantine_undecodable, url, [QUEUE_BULK], EXCHANGE_RETRY_READY)

    reasons = tuple(reason for _, reason in MALFORMED)
    assert report == QuarantineReport(scanned=len(everything), quarantined=reasons)
    warnings = [r.getMessage() for r in caplog.records if r.name == "shared.broker.quarantine"]
    assert len(warnings) == len(MALFORMED)
    for warning, reason in zip(warnings, reasons, strict=True):
        assert reason in warning
    assert "bad-timestamp" in warnings[0]
    assert "no readable message_id" in warnings[2]

    # The good ones are back in their order, and aio-pika now reads the whole lane.
    remaining = await drain(broker, QUEUE_BULK)
    assert [d.envelope.body for d in remaining] == [g.body for g in goods]
    assert [d.envelope.routing_key for d in remaining] == [g.routing_key for g in goods]
    assert [d.envelope.message_id for d in remaining] == [g.properties.message_id for g in goods]

    # Each malformed one waits in the retry return queue as a copy aio-pika can decode, saying why.
    copies = await drain(broker, QUEUE_RETRY_READY)
    assert [c.envelope.body for c in copies] == [bad.body for bad, _ in MALFORMED]
    assert [c.envelope.routing_key for c in copies] == [bad.routing_key for bad, _ in MALFORMED]
    assert [c.envelope.headers[QUARANTINE_HEADER] for c in copies] == list(reasons)
    assert all(c.envelope.delivery_mode == 2 for c in copies)
    by_body = {c.envelope.body: c.envelope for c in copies}
    assert by_body[b"bad-timestamp"].timestamp is None
    assert by_body[b"bad-timestamp"].message_id == "bad-timestamp"
    assert by_body[b"bad-app-id"].app_id is None
    assert by_body[b"bad-message-id"].message_id is None
    assert by_body[b"bad-header-name"].headers["camera_id"] == "bad-header-name"
    assert not broker.is_closed


async def test_sweep_of_healthy_queue_changes_nothing(
    topology_settings: AdminSettings, broker: Broker
) -> None:
    url = topology_settings.amqp_url
    goods = [good(i) for i in range(3)]
    await asyncio.to_thread(publish_with_pika, url, goods)

    report = await asyncio.to_thread(
        quarantine_undecodable, url, [QUEUE_BULK, QUEUE_RETRY_READY], EXCHANGE_RETRY_READY
    )

    assert report == QuarantineReport(scanned=3, quarantined=())
    assert [d.envelope.body for d in await drain(broker, QUEUE_BULK)] == [g.body for g in goods]
    assert await broker.queue_depth(QUEUE_RETRY_READY) == 0


async def test_sweep_stops_at_its_scan_limit(topology_settings: AdminSettings, broker: Broker) -> None:
    url = topology_settings.amqp_url
    everything, _ = interleaved()
    await asyncio.to_thread(publish_with_pika, url, everything)

    report = await asyncio.to_thread(quarantine_undecodable, url, [QUEUE_BULK], EXCHANGE_RETRY_READY, 2)

    assert report == QuarantineReport(scanned=2, quarantined=(MALFORMED[0][1],))
    await wait_for_depth(broker, QUEUE_BULK, len(everything) - 1)
    assert await broker.queue_depth(QUEUE_RETRY_READY) == 1


async def test_header_timestamp_out_of_range_defeats_pika_too(
    topology_settings: AdminSettings, broker: Broker
) -> None:
    """A known limit: pika cannot decode it either; the sweep fails loudly and leaves the queue as it was."""
    url = topology_settings.amqp_url
    poison = malformed("header-timestamp", headers={"captured": FarFutureTimestamp(2000, 1, 1)})
    await asyncio.to_thread(publish_with_pika, url, [good(0), poison, good(1)])

    with pytest.raises(BrokerUnavailableError, match="connection lost"):
        await asyncio.to_thread(quarantine_undecodable, url, [QUEUE_BULK], EXCHANGE_RETRY_READY)

    await wait_for_depth(broker, QUEUE_BULK, 3)
    assert await broker.queue_depth(QUEUE_RETRY_READY) == 0
