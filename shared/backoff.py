"""One way to wait between failed tries of a service that is away: exponential, with jitter, until it works
or the process stops.

Every "the broker or Postgres is not there yet" loop goes through :func:`until_it_works` (tenacity), so a
fleet of replicas that lost the same broker does not come back in lock step, and a stop request ends the
wait at once instead of after the current delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential,
    wait_random,
)

from shared.errors import DetfleetError

T = TypeVar("T")

logger = logging.getLogger(__name__)


class Stopped(Exception):
    """The process was asked to stop while it waited for a service."""


async def until_it_works(
    attempt: Callable[[], Awaitable[T]],
    what: str,
    stopping: asyncio.Event,
    first_s: float = 0.5,
    max_s: float = 30.0,
) -> T:
    """Await ``attempt()`` until it returns, waiting longer after each :class:`DetfleetError` it raises.

    Raises :class:`Stopped` once ``stopping`` is set. Errors that are not ours are bugs and propagate.
    """

    async def sleep(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), seconds)

    def log(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        logger.warning("%s failed (try %d), again in %.1f s: %s", what, state.attempt_number, wait, error)

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(DetfleetError),
        wait=wait_exponential(multiplier=first_s, max=max_s) + wait_random(0, first_s),
        stop=lambda _: stopping.is_set(),
        sleep=sleep,
        before_sleep=log,
        reraise=True,
    )

    async def call() -> T:  # tenacity awaits only what is a coroutine function itself
        return await attempt()

    if stopping.is_set():
        raise Stopped(what)
    try:
        result: T = await retrying(call)
    except DetfleetError as error:
        if stopping.is_set():
            raise Stopped(what) from error
        raise
    return result
