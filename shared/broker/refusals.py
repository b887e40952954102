"""Connection refusals told apart from outages: a wrong password or vhost never heals by retrying.

RabbitMQ closes the connection during the handshake for both; aiormq reports a refused vhost as an
``InvalidFrameError`` ("expected Connection.OpenOk, got Connection.Close"), which means nothing to a person.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from urllib.parse import urlsplit

from aio_pika.exceptions import AMQPConnectionError, ProbableAuthenticationError
from aiormq.exceptions import InvalidFrameError

from shared.broker.tls import tls_files
from shared.errors import BrokerRefusedError, BrokerUnavailableError
from shared.settings import mask_url
from shared.topology import vhost_of


@contextlib.contextmanager
def connect_refusals(url: str) -> Iterator[None]:
    """Raise :class:`BrokerRefusedError` naming the user or the vhost when the handshake is refused, and
    :class:`BrokerUnavailableError` in plain words when nothing answers."""
    shown = mask_url(url)
    try:
        yield
    except ProbableAuthenticationError:
        raise BrokerRefusedError(f"{shown}: login refused (wrong user or password)") from None
    except AMQPConnectionError as error:
        reason = error.args[-1] if error.args else error
        if tls_failure := _tls_failure(error):
            raise BrokerRefusedError(f"{shown}: TLS handshake failed ({tls_failure})") from error
        raise BrokerUnavailableError(f"{shown}: unreachable ({reason}){_certificate_hint(url)}") from error
    except InvalidFrameError as error:
        if "Connection.Close" not in str(error):
            raise
        raise BrokerRefusedError(
            f"{shown}: vhost {vhost_of(url)!r} refused (it does not exist, or the user may not use it)"
        ) from None


def _tls_failure(error: BaseException) -> str | None:
    """The reason of the TLS error behind ``error``, if one is: the broker's certificate did not verify,
    or the broker wanted a client certificate. aiormq wraps it, in ``args`` or as the cause."""
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and seen not in chain:  # a chain can loop back on itself
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for link in chain:
        found = next((a for a in (link, *link.args) if isinstance(a, ssl.SSLError)), None)
        if found is not None and found.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
            return "the broker requires a client certificate, put certfile and keyfile on the URL"
        if found is not None:
            words = (found.reason or "").replace("_", " ").lower()
            detail = getattr(found, "verify_message", None)
            return f"{words}: {detail}" if detail else words or str(found)
    return None


def _certificate_hint(url: str) -> str:
    """With TLS 1.3 a broker that wants a client certificate often just resets the connection before its
    alert is read; an ``amqps`` URL without ``certfile`` is then the likely cause, so say so."""
    if urlsplit(url).scheme != "amqps" or "certfile" in tls_files(url):
        return ""
    return "; if the broker requires a client certificate, put certfile and keyfile on the URL"
