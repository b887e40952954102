"""The producer's side of the aio-pika seam: one plain connection with one confirm channel.

The connection is deliberately not robust: the producer reconnects by itself, so it knows exactly which
publishes were in flight when a connection died and resends those (a robust connection restores its
channel in the background but never replays a failed publish).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from shared.broker.aio import to_message, translated_errors
from shared.broker.nodes import first_that_answers
from shared.broker.tls import tls_context
from shared.errors import BrokerError, BrokerUnavailableError, PublishNackedError
from shared.schema import Envelope
from shared.settings import mask_url

logger = logging.getLogger(__name__)


# A channel whose publishes are nacked this many times in a row gets a fresh successor (at most one per
# RENEW_EVERY_S). RabbitMQ 3.10 can leave a channel that first published to a quorum queue while the queue
# was electing a new leader nacking every publish to it for good, while a new channel is confirmed at once
# (docs/disaster-recovery.md). A queue that is really full nacks the successor too: the nack still reaches
# the caller either way, so backoff and backpressure stay as they are; a renewal costs one channel.open.
NACKS_BEFORE_RENEW = 3
RENEW_EVERY_S = 2.0


class ConfirmChannel:
    """Publishes to one exchange with publisher confirms and ``mandatory`` on every message."""

    def __init__(self, connection: AbstractConnection, channel: AbstractChannel, exchange: AbstractExchange):
        self._connection = connection
        self._channel = channel
        self._exchange = exchange
        self.url = ""  # the node URL this channel's connection reached
        self.renewals = 0
        self._nacks_in_a_row = 0
        self._renewed_at = time.monotonic()
        self._renewing = False
        self._in_flight: dict[AbstractChannel, int] = {}
        self._retired: list[AbstractChannel] = []  # replaced; closed once their publishes are settled

    @classmethod
    async def open(cls, url: str, name: str, exchange: str, timeout: float = 10.0) -> ConfirmChannel:
        """Connect to the first node of ``url`` (one AMQP URL or several, comma-separated) that answers and
        check that ``exchange`` exists, or raise one of our :class:`BrokerError` types."""

        async def one(node: str) -> ConfirmChannel:
            return await cls._open_node(node, name, exchange, timeout)

        return await first_that_answers(url, one)

    @classmethod
    async def _open_node(cls, url: str, name: str, exchange: str, timeout: float) -> ConfirmChannel:
        context = tls_context(url)
        with translated_errors(f"connect to {mask_url(url)}"):
            connection = await aio_pika.connect(
                url, client_properties={"connection_name": name}, timeout=timeout, ssl_context=context
            )
        try:
            channel, target = await _confirm_channel(connection, exchange)
        except BaseException:
            await _close_quietly(connection)
            raise
        opened = cls(connection, channel, target)
        opened.url = url
        return opened

    async def publish(self, envelope: Envelope) -> None:
        """Publish and wait for the broker's confirm.

        Raises :class:`~shared.errors.UnroutableError` on a return, :class:`~shared.errors.PublishNackedError`
        on a nack and :class:`~shared.errors.BrokerUnavailableError` (or another :class:`BrokerError`) when
        the connection or channel dies first: then the broker may or may not have the message.
        """
        channel, exchange = self._channel, self._exchange
        self._in_flight[channel] = self._in_flight.get(channel, 0) + 1
        try:
            with translated_errors(f"publish {envelope.message_id}"):
                await exchange.publish(to_message(envelope), envelope.routing_key, mandatory=True)
        except PublishNackedError:
            self._nacks_in_a_row += 1
            if self._due_for_renewal(channel):
                await self._renew()
            raise
        else:
            self._nacks_in_a_row = 0
        finally:
            self._in_flight[channel] -= 1
            await self._close_settled_retired()

    def _due_for_renewal(self, channel: AbstractChannel) -> bool:
        return (
            channel is self._channel
            and not self._renewing
            and self._nacks_in_a_row >= NACKS_BEFORE_RENEW
            and time.monotonic() - self._renewed_at >= RENEW_EVERY_S
        )

    async def _renew(self) -> None:
        """Publish on a fresh channel from now on; the old one closes once its confirms are in."""
        self._renewing = True
        try:
            channel, exchange = await _confirm_channel(self._connection, self._exchange.name)
        except BrokerError as error:  # the connection is going: its loss is handled where it is seen
            logger.info("Could not open a fresh confirm channel: %s", error)
            return
        finally:
            self._renewing = False
            self._renewed_at = time.monotonic()
        logger.warning(
            "%d publishes nacked in a row on %s: publishing on a fresh channel",
            self._nacks_in_a_row,
            mask_url(self.url) or "the broker",
        )
        self._retired.append(self._channel)
        self._channel, self._exchange = channel, exchange
        self._nacks_in_a_row = 0
        self.renewals += 1

    async def _close_settled_retired(self) -> None:
        settled = [c for c in self._retired if not self._in_flight.get(c)]
        for channel in settled:
            self._retired.remove(channel)
            self._in_flight.pop(channel, None)
            with contextlib.suppress(Exception):  # closing a channel of a dying connection raises
                await channel.close()

    def on_close(self, callback: Callable[[str], None]) -> None:
        """Call ``callback`` with a reason once the connection closes, whoever closed it."""

        def closed(_: object, error: BaseException | None = None) -> None:
            callback(repr(error) if error is not None else "closed")

        self._connection.close_callbacks.add(closed)

    @property
    def is_closed(self) -> bool:
        return bool(self._connection.is_closed)

    async def close(self) -> None:
        await _close_quietly(self._connection)


async def _confirm_channel(
    connection: AbstractConnection, exchange: str
) -> tuple[AbstractChannel, AbstractExchange]:
    with translated_errors("open a confirm channel"):
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    try:
        with translated_errors(f"find exchange {exchange}"):
            return channel, await channel.get_exchange(exchange, ensure=True)
    except BrokerUnavailableError:
        raise
    except BrokerError as error:
        # A passive declare of a missing exchange closes the channel with 404: a set-up problem, not a blip.
        raise BrokerError(f"exchange {exchange!r} not found: apply the topology first ({error})") from error


async def _close_quietly(connection: AbstractConnection) -> None:
    # Closing a connection that already died raises from deep inside aiormq; there is nothing to do about it.
    with contextlib.suppress(Exception):
        await connection.close()


__all__ = ["ConfirmChannel"]
