"""Live result events for one HTTP client: a server-named queue bound to ``detfleet.results`` with the
client's filter, open as long as the client is (docs/results.md, "Subscribing").

Events are at least once; a stream drops the oldest it holds when its client reads slower than they arrive
(a live view wants the newest), and counts what it dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from shared.broker.aio import Broker, Delivery, Subscription
from shared.errors import TaskValidationError
from shared.events import ResultEvent, binding_key
from shared.topology import EXCHANGE_RESULTS

logger = logging.getLogger(__name__)


class ResultStream:
    """Events matching one filter, in arrival order, read with :meth:`next`."""

    def __init__(self, capacity: int) -> None:
        self._events: asyncio.Queue[ResultEvent] = asyncio.Queue(capacity)
        self.dropped = 0

    async def on_delivery(self, delivery: Delivery) -> None:
        try:
            event = ResultEvent.from_json(delivery.envelope.body)
        except TaskValidationError as error:
            logger.warning("Skipped a result event that does not parse: %s", error)
        else:
            self._put(event)
        await delivery.ack()

    def _put(self, event: ResultEvent) -> None:
        if self._events.full():
            self._events.get_nowait()
            self.dropped += 1
        self._events.put_nowait(event)

    async def next(self) -> ResultEvent:
        return await self._events.get()


@asynccontextmanager
async def subscribed(
    broker: Broker, capacity: int, status: str | None, site: str | None, camera: str | None
) -> AsyncIterator[ResultStream]:
    """A :class:`ResultStream` bound to the exchange for the block's duration; its queue goes with it."""
    stream = ResultStream(capacity)
    subscription: Subscription = await broker.subscribe(
        EXCHANGE_RESULTS, [binding_key(status, site, camera)], stream.on_delivery, prefetch=100
    )
    try:
        yield stream
    finally:
        await subscription.cancel()
        await subscription.close()
