"""aio-pika behind detfleet's own types: connect, declare, publish with confirms, consume, settle."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import (
    AMQPConnectionError,
    AMQPError,
    ChannelClosed,
    ChannelInvalidStateError,
    DeliveryError,
    PublishError,
)

from shared.broker.nodes import first_that_answers
from shared.broker.refusals import connect_refusals
from shared.broker.tls import tls_context
from shared.errors import (
    BrokerError,
    BrokerUnavailableError,
    PublishNackedError,
    PublishTimeoutError,
    UnroutableError,
)
from shared.schema import Envelope
from shared.settings import mask_url
from shared.topology import Topology

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def translated_errors(what: str) -> Iterator[None]:
    """Turn aio-pika/aiormq errors into ours, so nothing above the seam sees library types."""
    try:
        yield
    except PublishError as error:
        raise UnroutableError(f"{what}: unroutable, no queue bound for this routing key") from error
    except DeliveryError as error:
        raise PublishNackedError(f"{what}: the broker refused it (queue full?)") from error
    except TimeoutError as error:
        raise PublishTimeoutError(
            f"{what}: no answer from the broker in time (blocked by an alarm?)"
        ) from error
    except (AMQPConnectionError, ConnectionError, ChannelInvalidStateError) as error:
        raise BrokerUnavailableError(f"{what}: connection lost ({error!r})") from error
    except (ChannelClosed, AMQPError) as error:
        raise BrokerError(f"{what}: {error!r}") from error


def to_message(envelope: Envelope) -> aio_pika.Message:
    expiration = None if envelope.expiration_ms is None else timedelta(milliseconds=envelope.expiration_ms)
    return aio_pika.Message(
        body=envelope.body,
        headers=dict(envelope.headers),
        message_id=envelope.message_id,
        timestamp=envelope.timestamp,
        app_id=envelope.app_id,
        content_type=envelope.content_type,
        delivery_mode=envelope.delivery_mode,
        expiration=expiration,
    )


def to_envelope(message: AbstractIncomingMessage) -> Envelope:
    # aio-pika decodes the expiration property into seconds.
    expiration = message.expiration
    return Envelope(
        body=message.body,
        routing_key=message.routing_key or "",
        exchange=message.exchange or "",
        message_id=message.message_id,
        timestamp=message.timestamp,
        app_id=message.app_id,
        content_type=message.content_type,
        expiration_ms=None if not isinstance(expiration, int | float) else round(expiration * 1000),
        delivery_mode=int(message.delivery_mode or 1),
        headers=dict(message.headers or {}),
        redelivered=bool(message.redelivered),
    )


@dataclass
class Delivery:
    """A received message: its envelope plus the means to settle it on the channel it came from."""

    envelope: Envelope
    queue: str
    delivery_tag: int
    _message: AbstractIncomingMessage

    async def ack(self, multiple: bool = False) -> bool:
        """Ack; False when the channel died first (the broker has requeued it already)."""
        return await self._settle(self._message.ack(multiple=multiple))

    async def requeue(self) -> bool:
        return await self._settle(self._message.nack(requeue=True))

    async def _settle(self, action: Awaitable[None]) -> bool:
        try:
            await action
        except (ChannelInvalidStateError, AMQPError, ConnectionError) as error:
            logger.warning("Stale delivery tag %d on %s: %r", self.delivery_tag, self.queue, error)
            return False
        return True


DeliveryHandler = Callable[[Delivery], Awaitable[None]]


class Subscription:
    """One consumer on a channel of its own. ``cancel`` stops new deliveries; ``close`` frees the channel,
    once every delivery taken on it is settled (closing earlier hands them back to the broker)."""

    def __init__(self, channel: AbstractChannel, source: AbstractQueue, tag: str) -> None:
        self._channel = channel
        self._source = source
        self._tag = tag

    async def cancel(self) -> None:
        with contextlib.suppress(AMQPError, ConnectionError, ChannelInvalidStateError):
            await self._source.cancel(self._tag)

    async def close(self) -> None:
        with contextlib.suppress(AMQPError, ConnectionError, ChannelInvalidStateError):
            await self._channel.close()


@dataclass(frozen=True)
class ConnectionLoss:
    """Why a connection closed. ``undecodable_frame``: the client could not parse a message's properties
    (aiormq issue 186); reconnecting straight away would get the same message and die again."""

    reason: str
    undecodable_frame: bool


class Broker:
    """One robust connection. Publishing goes through a confirm channel with mandatory always on."""

    def __init__(self, connection: AbstractRobustConnection, publish_channel: AbstractChannel) -> None:
        self._connection = connection
        self._publish_channel = publish_channel
        self._exchanges: dict[str, AbstractExchange] = {}
        self.url = ""  # the node URL this connection reached (one of the setting's list)

    @classmethod
    async def connect(cls, url: str, name: str, robust: bool = True, timeout: float = 10.0) -> Broker:
        """Connect to the first node of ``url`` (one AMQP URL or several, comma-separated) that answers,
        or raise :class:`BrokerUnavailableError` naming the masked URLs.

        A robust connection reconnects to the node it first reached only; detfleet's own processes use
        ``robust=False`` and reconnect through :meth:`connect` again, which walks every node."""

        async def one(node: str) -> Broker:
            return await cls._connect_node(node, name, robust, timeout)

        return await first_that_answers(url, one)

    @classmethod
    async def _connect_node(cls, url: str, name: str, robust: bool, timeout: float) -> Broker:
        context = tls_context(url)
        with translated_errors(f"connect to {mask_url(url)}"), connect_refusals(url):
            connect = aio_pika.connect_robust if robust else aio_pika.connect
            connection = await connect(
                url, client_properties={"connection_name": name}, timeout=timeout, ssl_context=context
            )
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        broker = cls(connection, channel)  # type: ignore[arg-type]
        broker.url = url
        return broker

    def on_close(self, callback: Callable[[ConnectionLoss], None]) -> None:
        """Call ``callback`` once when the connection closes, for whatever reason."""

        def closed(_: object, error: BaseException | None = None) -> None:
            undecodable = isinstance(error, aiormq.exceptions.ProtocolSyntaxError)
            callback(ConnectionLoss(repr(error) if error else "closed", undecodable))

        self._connection.close_callbacks.add(closed)

    @property
    def is_closed(self) -> bool:
        """True once the connection or its publishing channel is gone (either makes it useless)."""
        return bool(self._connection.is_closed or self._publish_channel.is_closed)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._connection.close()

    async def declare(self, topology: Topology) -> None:
        """Declare every exchange, queue and binding (idempotent; arguments must match)."""
        with translated_errors("declare topology"):
            channel = await self._connection.channel()
            try:
                for spec in topology.exchanges:
                    await channel.declare_exchange(spec.name, spec.type, durable=True)
                for queue in topology.queues:
                    await channel.declare_queue(queue.name, durable=True, arguments=queue.arguments)
                for b in topology.bindings:
                    queue_ = await channel.get_queue(b.queue, ensure=False)
                    await queue_.bind(b.exchange, routing_key=b.routing_key)
            finally:
                await channel.close()

    async def publish(
        self, envelope: Envelope, exchange: str, timeout: float | None = 10.0, mandatory: bool = True
    ) -> None:
        """Publish and wait for the broker's confirm; nacks raise our errors, and so do returns unless
        ``mandatory`` is off (an event that no subscriber's queue is bound for is fine)."""
        with translated_errors(f"publish {envelope.message_id} to {exchange or '(default)'}"):
            target = await self._exchange(exchange)
            await target.publish(
                to_message(envelope), envelope.routing_key, mandatory=mandatory, timeout=timeout
            )

    async def _exchange(self, name: str) -> AbstractExchange:
        if name not in self._exchanges:
            if name == "":
                self._exchanges[name] = self._publish_channel.default_exchange
            else:
                self._exchanges[name] = await self._publish_channel.get_exchange(name, ensure=False)
        return self._exchanges[name]

    async def consume(self, queue: str, handler: DeliveryHandler, prefetch: int) -> Subscription:
        """Consume ``queue`` on its own channel with its own prefetch.

        One channel per consumer keeps ``ack(multiple=True)`` from reaching another queue's deliveries.
        """
        with translated_errors(f"consume {queue}"):
            channel = await self._connection.channel()
            await channel.set_qos(prefetch_count=prefetch)
            source = await channel.get_queue(queue, ensure=False)

            async def on_message(message: AbstractIncomingMessage) -> None:
                await handler(Delivery(to_envelope(message), queue, message.delivery_tag or 0, message))

            tag = await source.consume(on_message)
        return Subscription(channel, source, tag)

    async def subscribe(
        self,
        exchange: str,
        keys: Sequence[str],
        handler: DeliveryHandler,
        prefetch: int = 100,
        queue: str | None = None,
    ) -> Subscription:
        """Bind a queue to ``exchange`` with each of ``keys`` and consume it on a channel of its own.

        ``queue`` None: a server-named, exclusive queue that goes with the connection (a live view); a
        name: a durable queue, declared if missing, that keeps what arrives while nobody consumes.
        """
        with translated_errors(f"subscribe to {exchange}"):
            channel = await self._connection.channel()
            await channel.set_qos(prefetch_count=prefetch)
            source = await _bound_queue(channel, exchange, keys, queue)

            async def on_message(message: AbstractIncomingMessage) -> None:
                await handler(Delivery(to_envelope(message), source.name, message.delivery_tag or 0, message))

            tag = await source.consume(on_message)
        return Subscription(channel, source, tag)

    async def bind(
        self, exchange: str, keys: Sequence[str], queue: str, arguments: Mapping[str, Any] | None = None
    ) -> None:
        """Declare the durable ``queue`` (with ``arguments``) if missing and bind it to ``exchange`` with each
        of ``keys``: it keeps what arrives until somebody reads it (:meth:`reading`)."""
        with translated_errors(f"bind {queue} to {exchange}"):
            channel = await self._connection.channel()
            try:
                await _bound_queue(channel, exchange, keys, queue, arguments)
            finally:
                await channel.close()

    async def exchange_exists(self, name: str) -> bool:
        """True when ``exchange`` is declared (a passive declare on a channel of its own)."""
        with translated_errors(f"inspect exchange {name}"):
            channel = await self._connection.channel()
        try:
            await channel.declare_exchange(name, passive=True)
        except (AMQPError, ChannelInvalidStateError):
            return False
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        return True

    def open_channels(self) -> int:
        """Channels open on the connection now, the publishing one included (a leak shows here first)."""
        transport = self._connection.transport
        return 0 if transport is None else sum(1 for c in transport.connection.channels.values() if c)

    async def queue_depth(self, queue: str) -> int:
        """Ready messages in ``queue`` (passive declare)."""
        with translated_errors(f"inspect {queue}"):
            channel = await self._connection.channel()
            try:
                declared = await channel.declare_queue(queue, passive=True)
                return int(declared.declaration_result.message_count or 0)
            finally:
                await channel.close()

    async def queue_counts(self, queue: str) -> tuple[int, int]:
        """Ready messages and consumers of ``queue``: all a passive declare tells (no unacked, no rates)."""
        with translated_errors(f"inspect {queue}"):
            channel = await self._connection.channel()
            try:
                result = (await channel.declare_queue(queue, passive=True)).declaration_result
                return int(result.message_count or 0), int(result.consumer_count or 0)
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()

    async def purge(self, queue: str) -> int:
        """Delete every ready message of ``queue``; returns how many."""
        with translated_errors(f"purge {queue}"):
            channel = await self._connection.channel()
            try:
                source = await channel.get_queue(queue, ensure=False)
                result = await source.purge()
                return int(result.message_count or 0)
            finally:
                await channel.close()

    @contextlib.asynccontextmanager
    async def reading(self, queue: str) -> AsyncIterator[QueueReader]:
        """A channel for ``basic.get`` one message at a time: DLQ tools and tests."""
        with translated_errors(f"read {queue}"):
            channel = await self._connection.channel()
            source = await channel.get_queue(queue, ensure=False)
        try:
            yield QueueReader(queue, source)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()


async def _bound_queue(
    channel: AbstractChannel,
    exchange: str,
    keys: Sequence[str],
    queue: str | None,
    arguments: Mapping[str, Any] | None = None,
) -> AbstractQueue:
    if queue is None:
        source = await channel.declare_queue(exclusive=True, auto_delete=True)
    else:
        source = await channel.declare_queue(queue, durable=True, arguments=dict(arguments or {}))
    for key in keys:
        await source.bind(exchange, key)
    return source


class QueueReader:
    def __init__(self, name: str, queue: Any) -> None:
        self._name = name
        self._queue = queue

    async def get(self, timeout: float = 5.0) -> Delivery | None:
        with translated_errors(f"get from {self._name}"):
            message = await self._queue.get(fail=False, no_ack=False, timeout=timeout)
        if message is None:
            return None
        return Delivery(to_envelope(message), self._name, message.delivery_tag or 0, message)


__all__ = [
    "Broker",
    "ConnectionLoss",
    "Delivery",
    "DeliveryHandler",
    "QueueReader",
    "Subscription",
    "translated_errors",
]
