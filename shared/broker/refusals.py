"""Connection refusals told apart from outages: a wrong password or vhost never heals by retrying.

RabbitMQ closes the connection during the handshake for both; aiormq reports a refused vhost as an
``InvalidFrameError`` ("expected Connection.OpenOk, got Connection.Close"), which means nothing to a person.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from aio_pika.exceptions import AMQPConnectionError, ProbableAuthenticationError
from aiormq.exceptions import InvalidFrameError

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
        raise BrokerUnavailableError(f"{shown}: unreachable ({reason})") from error
    except InvalidFrameError as error:
        if "Connection.Close" not in str(error):
            raise
        raise BrokerRefusedError(
            f"{shown}: vhost {vhost_of(url)!r} refused (it does not exist, or the user may not use it)"
        ) from None
