"""TLS to RabbitMQ from the AMQP URL alone, one context for both client libraries.

An ``amqps://`` URL carries its certificates as query parameters, the names aiormq reads itself:
``cafile`` (the CA that signed the broker's certificate), ``certfile`` and ``keyfile`` (this client's
certificate and key, when the broker asks for one). The URL is the one setting every process already has
(``DETFLEET_AMQP_URL``), so TLS needs no code above the seam. aio-pika gets the context built here rather
than its own, and pika, which rejects query parameters it does not know, gets the URL without them and
the same context, so the two clients can never verify the broker differently. The context always checks
the broker's certificate and host name; there is deliberately no switch to turn that off.
"""

from __future__ import annotations

import ssl
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from shared.errors import BrokerError
from shared.settings import AMQP_CERTIFICATE_PARAMS, mask_url

TLS_QUERY_KEYS = AMQP_CERTIFICATE_PARAMS


def tls_files(url: str) -> dict[str, str]:
    """The certificate files ``url`` names, by query parameter."""
    return {k: v for k, v in parse_qsl(urlsplit(url).query) if k in TLS_QUERY_KEYS}


def tls_context(url: str) -> ssl.SSLContext | None:
    """The client context for an ``amqps://`` URL (None for ``amqp://``), or a :class:`BrokerError`
    naming the file that cannot be read."""
    if urlsplit(url).scheme != "amqps":
        return None
    files = tls_files(url)
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=files.get("cafile"))
        if "certfile" in files:
            context.load_cert_chain(files["certfile"], files.get("keyfile"))
    except (OSError, ssl.SSLError) as error:
        raise BrokerError(f"{mask_url(url)}: TLS certificate files unusable ({error})") from error
    return context


def without_tls_query(url: str) -> str:
    """``url`` without the certificate parameters: what pika's URL parser accepts."""
    parts = urlsplit(url)
    kept = [(k, v) for k, v in parse_qsl(parts.query) if k not in TLS_QUERY_KEYS]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(kept), parts.fragment))


__all__ = ["TLS_QUERY_KEYS", "tls_context", "tls_files", "without_tls_query"]
