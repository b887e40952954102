"""The broker side of a worker: one connection at a time, consuming the work queues on a channel each.

A connection generation connects, consumes every work queue with its own prefetch and waits until the
connection is lost or the worker stops (then the caller's drain runs while it still stands). Reconnects
and quarantine sweeps back off with :func:`shared.backoff.until_it_works`. While the sink is away the
worker pauses: the consumers are cancelled, their channels stay open until what they delivered is
settled (an ack must travel on the channel that delivered), then close. Each channel has its own
:class:`~consumer.acker.Acker`, the ledger settling acks through; this module never acks or requeues.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from consumer.acker import Acker
from consumer.health import HealthState
from consumer.jobs import Job
from consumer.metrics import ConsumerMetrics
from shared.backoff import Stopped, until_it_works
from shared.broker.aio import Broker, ConnectionLoss, Delivery, DeliveryHandler, Subscription
from shared.broker.quarantine import quarantine_undecodable
from shared.errors import BrokerError
from shared.settings import ConsumerSettings
from shared.topology import (
    EXCHANGE_RETRY_READY,
    QUEUE_BULK,
    QUEUE_INTAKE,
    QUEUE_REALTIME,
    QUEUE_RETRY_READY,
    WORK_QUEUES,
    Topology,
)

logger = logging.getLogger(__name__)

CLOSE_REASON_WAIT_S = 5.0

Receive = Callable[[Job], Awaitable[None]]


class Connection:
    def __init__(
        self,
        settings: ConsumerSettings,
        receive: Receive,
        on_lost: Callable[[], None],
        health: HealthState,
        metrics: ConsumerMetrics,
    ) -> None:
        self._settings = settings
        self._receive = receive
        self._on_lost = on_lost
        self._health = health
        self._metrics = metrics
        self._retry_levels = Topology.from_settings(settings).retry_levels
        self._broker: Broker | None = None
        self._publisher: Broker | None = None
        self._ledgers: list[Acker] = []  # every channel of this connection that may still hold deliveries
        self._consuming: list[tuple[Acker, Subscription]] = []
        self._retiring: list[tuple[Acker, Subscription]] = []  # cancelled; closed once their ledger is empty
        self.paused = False

    @property
    def broker(self) -> Broker | None:
        """The current consuming connection, or None between connections."""
        return None if self._broker is None or self._broker.is_closed else self._broker

    async def publisher(self) -> Broker | None:
        """The publishing connection, (re)connected on demand; None when the broker cannot be reached.

        Copies go out on a connection of their own, as RabbitMQ advises: a consuming connection dies when
        the client cannot decode a delivery, and a copy in flight on it would lose its confirm, so its
        redelivery would publish it a second time."""
        if self._publisher is not None and not self._publisher.is_closed:
            return self._publisher
        if self._publisher is not None:  # its channel died (a refused publish): the connection may live on
            await self._publisher.close()
            self._publisher = None
        name = f"detfleet-consumer:{self._settings.consumer_id}:publish"
        try:
            self._publisher = await Broker.connect(self._settings.amqp_url, name, robust=False)
        except BrokerError as error:
            logger.warning("No publishing connection: %s", error)
            return None
        return self._publisher

    async def close(self) -> None:
        if self._publisher is not None:
            await self._publisher.close()

    def ledgers(self) -> list[Acker]:
        return list(self._ledgers)

    def held(self) -> int:
        """Deliveries taken on this connection and not yet settled."""
        return sum(len(ledger) for ledger in self._ledgers)

    def open_channels(self) -> int:
        broker = self.broker
        return 0 if broker is None else broker.open_channels()

    async def serve(self, stopping: asyncio.Event, drain: Callable[[], Awaitable[None]]) -> None:
        """Connection generations until ``stopping``; ``drain`` runs on the last one before it closes."""
        while not stopping.is_set():
            try:
                loss = await until_it_works(
                    lambda: self._generation(stopping, drain), "consuming from the broker", stopping, 1.0
                )
                if loss is not None and loss.undecodable_frame:
                    await until_it_works(self._quarantine, "quarantine sweep", stopping, 1.0, 60.0)
            except Stopped:
                return

    async def pause(self) -> None:
        """Take no more deliveries until :meth:`resume` (what is held still settles on its channel)."""
        if self.paused:
            return
        self.paused = True
        stopped, self._consuming = self._consuming, []
        for _, subscription in stopped:
            await subscription.cancel()
        self._retiring.extend(stopped)
        self._metrics.ready.set(0)

    async def resume(self) -> None:
        self.paused = False
        if self.broker is None:
            return  # the next generation consumes
        try:
            await self._start_consuming()
        except BrokerError as error:  # the connection is going: its next generation consumes instead
            logger.warning("Could not resume consuming: %s", error)

    async def close_settled_channels(self) -> None:
        """Close each cancelled consumer's channel once everything it delivered is settled, so repeated
        pauses cannot pile channels up to the limit."""
        settled = [(ledger, sub) for ledger, sub in self._retiring if len(ledger) == 0]
        for ledger, subscription in settled:
            self._retiring.remove((ledger, subscription))
            self._ledgers.remove(ledger)
        for _, subscription in settled:
            await subscription.close()

    async def queues_empty(self) -> bool:
        """True when no work queue or retry level has a ready message (False when the broker is away)."""
        broker = self.broker
        if broker is None:
            return False
        try:
            for queue in (*WORK_QUEUES, *self._retry_levels):
                if await broker.queue_depth(queue):
                    return False
        except BrokerError:
            return False
        return True

    async def _generation(
        self, stopping: asyncio.Event, drain: Callable[[], Awaitable[None]]
    ) -> ConnectionLoss | None:
        """One connection: consume until it is lost (returns why) or ``stopping`` (drains, returns None).
        Raises :class:`BrokerError` when it could not connect or start consuming."""
        name = f"detfleet-consumer:{self._settings.consumer_id}"
        broker = await Broker.connect(self._settings.amqp_url, name, robust=False)
        lost: asyncio.Future[ConnectionLoss] = asyncio.get_running_loop().create_future()

        def on_loss(loss: ConnectionLoss) -> None:
            if not lost.done():
                lost.set_result(loss)

        broker.on_close(on_loss)
        self._broker = broker
        try:
            if not self.paused:
                await self._start_or_explain(lost)
            self._health.channel_open = True
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait([lost, stop], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
            stop.cancel()
            if stopping.is_set() and not lost.done():
                await drain()
                return None
            logger.warning("Connection lost (%s); the broker requeues what was held", lost.result().reason)
            return lost.result()
        except _Lost as loss:
            return loss.loss
        finally:
            self._health.channel_open = False
            self._forget()
            await broker.close()

    async def _start_or_explain(self, lost: asyncio.Future[ConnectionLoss]) -> None:
        """Start consuming. When that fails part-way the connection is usually dying (a lane delivered a
        message the client cannot decode while the next lane's channel was opening): its close reason
        decides what comes next. A connection that still stands is retried with backoff."""
        try:
            await self._start_consuming()
        except BrokerError as error:
            logger.warning("Could not start consuming: %s", error)
            with contextlib.suppress(TimeoutError):
                raise _Lost(await asyncio.wait_for(asyncio.shield(lost), CLOSE_REASON_WAIT_S)) from error
            raise

    async def _start_consuming(self) -> None:
        assert self._broker is not None
        s = self._settings
        prefetch = {
            QUEUE_REALTIME: s.lane_realtime_prefetch,
            QUEUE_BULK: s.bulk_prefetch,
            QUEUE_RETRY_READY: s.bulk_prefetch,
            QUEUE_INTAKE: s.max_batch,
        }
        for queue in WORK_QUEUES:
            ledger = Acker()
            self._ledgers.append(ledger)
            subscription = await self._broker.consume(queue, self._receiver(ledger), prefetch[queue])
            self._consuming.append((ledger, subscription))
        self._metrics.ready.set(1)

    def _receiver(self, ledger: Acker) -> DeliveryHandler:
        async def receive(delivery: Delivery) -> None:
            if ledger not in self._ledgers:  # a late delivery on a connection already forgotten
                return
            ledger.track(delivery)
            self._metrics.received.labels(delivery.queue).inc()
            self._metrics.in_flight.set(self.held())
            await self._receive(Job(delivery, ledger))

        return receive

    def _forget(self) -> None:
        """Deliveries of a dead connection are the broker's again: drop them without settling."""
        self._broker = None
        self._ledgers.clear()
        self._consuming.clear()
        self._retiring.clear()
        self._metrics.in_flight.set(0)
        self._metrics.ready.set(0)
        self._on_lost()

    async def _quarantine(self) -> None:
        """Move aside what the client cannot decode, so the next connection does not die on it again."""
        report = await asyncio.to_thread(
            quarantine_undecodable,
            self._settings.amqp_url,
            list(WORK_QUEUES),
            EXCHANGE_RETRY_READY,
            self._settings.bulk_prefetch * 4,
        )
        logger.warning(
            "Quarantine sweep: %d scanned, %d moved aside", report.scanned, len(report.quarantined)
        )


class _Lost(Exception):
    """Consuming could not start because the connection died; carries why."""

    def __init__(self, loss: ConnectionLoss) -> None:
        super().__init__(loss.reason)
        self.loss = loss
