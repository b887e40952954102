"""Reading the DLQ for payloads: one pass over its entries, taking the ones asked for, leaving the rest.

RabbitMQ has no way to read a classic or quorum queue without taking messages, so a pass takes each entry
once with ``basic.get`` (at most as many as the queue held when the pass began) and either *takes* it (the
caller acts, e.g. republishes it, then acks it) or *leaves* it:

- **classic** (the default): left entries are held unacked until the pass ends, then requeued in the order
  they came. Classic queues put a requeued message back where it was and count nothing, so a pass leaves
  the queue as it found it, apart from the ``redelivered`` flag. It holds the left entries' bodies in
  memory meanwhile, and a pass that dies hands them back through the broker (nothing is lost).
- **quorum**: every requeue raises the delivery count, and entries past ``x-delivery-limit`` are dropped,
  so a left entry is copied back to the DLQ first (confirmed) and only then acked: its count starts again
  at zero, at the cost of moving it to the tail. A pass that dies between the two leaves a second copy,
  which replay and purge handle as duplicates.

``detfleet dlq list`` never reads the DLQ: the failed rows in Postgres are the index.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from enum import Enum

from shared.broker.aio import Broker, Delivery
from shared.schema import H_REPLAYS
from shared.settings import QueueType
from shared.topology import EXCHANGE_DLQ, QUEUE_DLQ

logger = logging.getLogger(__name__)


class Verdict(Enum):
    TAKEN = "taken"  # the caller settled the entry itself
    LEAVE = "leave"  # put it back


@dataclass(frozen=True)
class Parked:
    """One DLQ entry as a pass reads it."""

    delivery: Delivery
    task_id: uuid.UUID | None
    replays: int
    size: int

    @classmethod
    def of(cls, delivery: Delivery) -> Parked:
        envelope = delivery.envelope
        try:
            task_id = uuid.UUID(str(envelope.message_id)) if envelope.message_id else None
        except ValueError:
            task_id = None
        replays = envelope.headers.get(H_REPLAYS, 0)
        count = replays if isinstance(replays, int) and not isinstance(replays, bool) else 0
        return cls(delivery, task_id, count, len(envelope.body))


Visit = Callable[[Parked], Awaitable[Verdict]]


@dataclass
class PassReport:
    seen: int = 0
    taken: int = 0
    left: int = 0
    interrupted: bool = False


async def one_pass(
    broker: Broker,
    queue_type: QueueType,
    visit: Visit,
    done: Callable[[], bool] = lambda: False,
    stop: asyncio.Event | None = None,
) -> PassReport:
    """Visit each entry the DLQ holds now, once; stop early when ``done()`` or ``stop`` is set."""
    report = PassReport()
    budget = await broker.queue_depth(QUEUE_DLQ)  # a quorum pass re-appends what it leaves: never loop
    held: list[Delivery] = []
    async with broker.reading(QUEUE_DLQ) as reader:
        try:
            while report.seen < budget and not done():
                if stop is not None and stop.is_set():
                    report.interrupted = True
                    break
                delivery = await reader.get()
                if delivery is None:
                    break
                report.seen += 1
                if await visit(Parked.of(delivery)) is Verdict.TAKEN:
                    report.taken += 1
                    continue
                report.left += 1
                if queue_type == "quorum":
                    await _copy_back(broker, delivery)
                else:
                    held.append(delivery)
        finally:
            for delivery in held:  # in the order they came: classic queues put each back where it was
                await delivery.requeue()
    return report


async def _copy_back(broker: Broker, delivery: Delivery) -> None:
    """Quorum: a fresh copy at the tail (delivery count zero), confirmed, before the original goes."""
    await broker.publish(replace(delivery.envelope, redelivered=False), EXCHANGE_DLQ)
    await delivery.ack()
