"""Move aside messages whose AMQP properties aio-pika cannot decode, so a consumer stops crash-looping.

aiormq decodes every content header with pamqp, and pamqp raises on some properties the broker accepts:
short strings that are not UTF-8 (``app_id``, ``message_id``, ``content_type``, a header's name) and
timestamps out of Python's range (the ``timestamp`` property, a timestamp inside ``headers``). The
exception kills the whole connection before any of our code sees the message, the broker requeues it, and
a consumer that reconnects receives it again first (aiormq issue 186).

pika decodes the same messages (a non-UTF-8 short string becomes ``bytes``, a timestamp property stays an
``int``), so after such a crash the consumer runs :func:`quarantine_undecodable` in a thread before it
reconnects: it holds the queues' messages on a pika channel, republishes a sanitised copy of each one pamqp
would choke on to the retry return exchange (whence the normal pipeline fails it as bad input, with a
result row and a DLQ entry) and hands the rest back in their original order.

Limit: a timestamp *inside* ``headers`` that pamqp cannot decode breaks pika's decoder too; the sweep then
fails with :class:`~shared.errors.BrokerUnavailableError` and such a message needs an operator.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pamqp.frame
import pika
import pika.exceptions
import pika.frame
from pika.adapters.blocking_connection import BlockingChannel

from shared.broker.tls import tls_context, without_tls_query
from shared.errors import (
    BrokerError,
    BrokerUnavailableError,
    PublishNackedError,
    PublishTimeoutError,
    UnroutableError,
)
from shared.schema import BROKER_DEATH_HEADERS
from shared.settings import amqp_node_urls, mask_url

logger = logging.getLogger(__name__)

# Set on the sanitised copy: why its original could not be decoded. The consumer fails such a message as
# bad input with this text as the reason.
QUARANTINE_HEADER = "x-detfleet-quarantined"

# Every basic property in AMQP 0-9-1 order; pika keeps each as an attribute of BasicProperties.
PROPERTY_NAMES = (
    "content_type",
    "content_encoding",
    "headers",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
    "cluster_id",
)
# Set afresh on the sanitised copy instead of copied: its headers are filtered, it is persistent whatever the
# original was, and an expiration left from the realtime lane could drop it before its failure is recorded.
_NOT_COPIED = frozenset({"headers", "delivery_mode", "expiration"})
# A blocked connection (memory or disk alarm) would otherwise hold the sweep's publish forever.
BLOCKED_TIMEOUT_S = 30.0
CONNECTION_NAME = "detfleet-quarantine"
PERSISTENT = 2


@dataclass(frozen=True)
class QuarantineReport:
    """What one sweep did: messages looked at, and one reason per message moved aside."""

    scanned: int
    quarantined: tuple[str, ...]


@dataclass(frozen=True)
class Diagnosis:
    """Why pamqp cannot decode a set of properties, and which properties and header entries are at fault."""

    reason: str
    bad_properties: frozenset[str]
    bad_headers: frozenset[str | bytes]


@dataclass(frozen=True)
class HeldMessage:
    """A message fetched with ``basic.get`` and not yet settled."""

    queue: str
    delivery_tag: int
    routing_key: str
    properties: pika.spec.BasicProperties
    body: bytes


def is_undecodable(properties: pika.spec.BasicProperties) -> str | None:
    """Why aiormq would fail to decode a message with these properties, or None when it would not."""
    diagnosis = diagnose(properties)
    return None if diagnosis is None else diagnosis.reason


def diagnose(properties: pika.spec.BasicProperties) -> Diagnosis | None:
    """Re-encode ``properties`` as the broker sends them and decode them as aiormq does.

    Each property and each header entry is then decoded on its own, to name the ones at fault.
    """
    error = unmarshal_error(properties)
    if error is None:
        return None
    bad_properties = dict(_bad_properties(properties))
    bad_headers = dict(_bad_headers(properties.headers or {}))
    reasons = [*bad_properties.values(), *bad_headers.values()]
    if not reasons:
        reasons = [f"message properties cannot be decoded ({_root_cause(error)})"]
    return Diagnosis("; ".join(reasons), frozenset(bad_properties), frozenset(bad_headers))


def unmarshal_error(properties: pika.spec.BasicProperties) -> Exception | None:
    """What pamqp raises on the content header frame carrying ``properties``, exactly as aiormq calls it."""
    frame = pika.frame.Header(1, 0, properties).marshal()
    try:
        pamqp.frame.unmarshal(frame)
    except Exception as error:  # aiormq's reader dies on whatever escapes here, not only pamqp's own errors
        return error
    return None


def _bad_properties(properties: pika.spec.BasicProperties) -> Iterator[tuple[str, str]]:
    for name in PROPERTY_NAMES:
        value = getattr(properties, name)
        if name == "headers" or value is None:
            continue
        error = unmarshal_error(pika.spec.BasicProperties(**{name: value}))
        if error is not None:
            yield name, f"{name} property {_describe(error)}"


def _bad_headers(headers: Mapping[str | bytes, Any]) -> Iterator[tuple[str | bytes, str]]:
    for key, value in headers.items():
        error = unmarshal_error(pika.spec.BasicProperties(headers={key: value}))
        if error is not None:
            yield key, f"header {_readable(key)} {_describe(error)}"


def _describe(error: Exception) -> str:
    cause = _root_cause(error)
    if isinstance(cause, UnicodeDecodeError):
        return "is not UTF-8 text"
    if "out of range" in str(cause) or isinstance(cause, OverflowError):
        return f"is out of range ({cause})"
    return f"cannot be decoded ({cause})"


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _readable(key: str | bytes) -> str:
    text = key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else key
    return f"'{text}'"


def sanitised_properties(
    properties: pika.spec.BasicProperties, diagnosis: Diagnosis
) -> pika.spec.BasicProperties:
    """A persistent copy without the offending properties and header entries, saying why in a header."""
    kept = {
        name: getattr(properties, name)
        for name in PROPERTY_NAMES
        if name not in _NOT_COPIED and name not in diagnosis.bad_properties
    }
    # Broker death headers go as on every republish: RabbitMQ 3.10 silently drops dead-letter cycles.
    headers = {
        key: value
        for key, value in (properties.headers or {}).items()
        if key not in diagnosis.bad_headers and key not in BROKER_DEATH_HEADERS
    }
    copy = pika.spec.BasicProperties(
        **kept, headers={**headers, QUARANTINE_HEADER: diagnosis.reason}, delivery_mode=PERSISTENT
    )
    if unmarshal_error(copy) is not None:
        # The offenders could not be told apart: keep nothing the client might choke on.
        return pika.spec.BasicProperties(
            headers={QUARANTINE_HEADER: diagnosis.reason}, delivery_mode=PERSISTENT
        )
    return copy


def quarantine_undecodable(
    amqp_url: str, queues: Sequence[str], return_exchange: str, scan_limit: int = 1000
) -> QuarantineReport:
    """Move every message aiormq cannot decode from the heads of ``queues`` to ``return_exchange``.

    Blocking: run it in a thread. Looks at up to ``scan_limit`` messages per queue, holding them all
    unacknowledged so a requeued one cannot come straight back to the next ``basic.get``. A sanitised copy
    of each undecodable message is published (mandatory, confirmed) before the original is acked; all the
    others are requeued at the end, which puts them back where they were. Raises a
    :class:`~shared.errors.BrokerError`; then the broker requeues whatever was still held.
    """
    with _translated_errors(f"quarantine sweep on {mask_url(amqp_url)}"):
        # pika walks a list of parameters itself: the first node that answers takes the sweep.
        connection = pika.BlockingConnection([_parameters(url) for url in amqp_node_urls(amqp_url)])
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            return _sweep(channel, queues, return_exchange, scan_limit)
        finally:
            with contextlib.suppress(pika.exceptions.AMQPError):
                connection.close()


def _parameters(amqp_url: str) -> pika.URLParameters:
    parameters = pika.URLParameters(without_tls_query(amqp_url))
    context = tls_context(amqp_url)
    if context is not None:
        parameters.ssl_options = pika.SSLOptions(context, urlsplit(amqp_url).hostname)
    parameters.client_properties = {"connection_name": CONNECTION_NAME}
    parameters.blocked_connection_timeout = BLOCKED_TIMEOUT_S
    return parameters


def _sweep(
    channel: BlockingChannel, queues: Sequence[str], return_exchange: str, limit: int
) -> QuarantineReport:
    # Fetch everything first: a copy published to a queue that is scanned later must not be counted again.
    held = [message for queue in queues for message in _hold(channel, queue, limit)]
    reasons: list[str] = []
    for message in held:
        diagnosis = diagnose(message.properties)
        if diagnosis is not None:
            _move_aside(channel, message, diagnosis, return_exchange)
            reasons.append(diagnosis.reason)
    if len(reasons) < len(held):
        channel.basic_nack(delivery_tag=0, multiple=True, requeue=True)
    return QuarantineReport(scanned=len(held), quarantined=tuple(reasons))


def _hold(channel: BlockingChannel, queue: str, limit: int) -> list[HeldMessage]:
    held: list[HeldMessage] = []
    while len(held) < limit:
        method, properties, body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            break
        held.append(HeldMessage(queue, method.delivery_tag, method.routing_key, properties, body))
    return held


def _move_aside(channel: BlockingChannel, message: HeldMessage, diagnosis: Diagnosis, exchange: str) -> None:
    channel.basic_publish(
        exchange,
        message.routing_key,
        message.body,
        sanitised_properties(message.properties, diagnosis),
        mandatory=True,
    )
    channel.basic_ack(message.delivery_tag)
    logger.warning(
        "Quarantined message %s from %s to %s: %s",
        _readable_id(message.properties.message_id),
        message.queue,
        exchange,
        diagnosis.reason,
    )


def _readable_id(message_id: object) -> str:
    return message_id if isinstance(message_id, str) else "(no readable message_id)"


@contextlib.contextmanager
def _translated_errors(what: str) -> Iterator[None]:
    """Turn pika's errors into ours, so nothing above the seam sees library types."""
    try:
        yield
    except pika.exceptions.UnroutableError as error:
        raise UnroutableError(f"{what}: unroutable, no queue bound to the return exchange") from error
    except pika.exceptions.NackError as error:
        raise PublishNackedError(f"{what}: the broker refused the sanitised copy (queue full?)") from error
    except pika.exceptions.ConnectionBlockedTimeout as error:
        raise PublishTimeoutError(
            f"{what}: the broker blocked the connection (memory or disk alarm?)"
        ) from error
    except (pika.exceptions.AMQPConnectionError, ConnectionError) as error:
        raise BrokerUnavailableError(f"{what}: connection lost ({error!r})") from error
    except pika.exceptions.AMQPError as error:
        raise BrokerError(f"{what}: {error!r}") from error


__all__ = [
    "QUARANTINE_HEADER",
    "Diagnosis",
    "QuarantineReport",
    "diagnose",
    "is_undecodable",
    "quarantine_undecodable",
    "sanitised_properties",
    "unmarshal_error",
]
