"""Several broker nodes behind one setting: connect to the first that answers, in the order given.

``DETFLEET_AMQP_URL`` may list the nodes of a cluster separated by commas. Every connect (the first one and
each reconnect after a connection loss) walks the list from the start and keeps the first node that
answers, so a client whose node died moves to the next one on its next try; the callers' reconnect loops
(:func:`shared.backoff.until_it_works`, the producer's own) put backoff and jitter between whole walks.
A node that refuses the login or the vhost stops the walk: the nodes of a cluster share their users and
vhosts, so the others would refuse too, and the error must reach the operator unchanged. Any other failure
moves on: a node that accepts TCP but stalls in the handshake must not hold every client on it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from shared.errors import BrokerError, BrokerRefusedError, BrokerUnavailableError
from shared.settings import amqp_node_urls, mask_url

T = TypeVar("T")

logger = logging.getLogger(__name__)


async def first_that_answers(urls: str, connect: Callable[[str], Awaitable[T]]) -> T:
    """``connect(url)`` for each node URL in ``urls`` until one works.

    A node that does not answer, answers too slowly or fails part-way (a channel that does not open, a
    handshake that times out while it elects leaders) is passed over; a refusal
    (:class:`BrokerRefusedError`: login, vhost, TLS) stops the walk at once. When every node failed, the
    first error that was not plain unavailability is raised (a missing exchange stays that error), else a
    :class:`BrokerUnavailableError` naming every node (masked). One node raises its own error."""
    nodes = amqp_node_urls(urls)
    failures: list[BrokerError] = []
    for url in nodes:
        try:
            connected = await connect(url)
        except BrokerRefusedError:
            raise
        except BrokerError as error:
            if len(nodes) == 1:
                raise
            logger.info("Node %s failed, trying the next: %s", mask_url(url), error)
            failures.append(error)
            continue
        if len(nodes) > 1:
            logger.info("Connected to node %s", mask_url(url))
        return connected
    other = next((f for f in failures if not isinstance(f, BrokerUnavailableError)), None)
    if other is not None:
        raise other
    raise BrokerUnavailableError(f"no node of {len(nodes)} answers: " + "; ".join(map(str, failures)))


__all__ = ["first_that_answers"]
