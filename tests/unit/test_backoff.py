"""The one backoff helper: retries our errors with growing waits, stops at once, lets bugs through."""

from __future__ import annotations

import asyncio

import pytest

from shared.backoff import Stopped, until_it_works
from shared.errors import BrokerUnavailableError

HANG_S = 5.0  # a bound against a hang, not a timing assertion


async def test_it_retries_our_errors_until_the_attempt_works() -> None:
    tries: list[int] = []

    async def attempt() -> str:
        tries.append(1)
        if len(tries) < 3:
            raise BrokerUnavailableError("not yet")
        return "connected"

    result = await asyncio.wait_for(until_it_works(attempt, "test", asyncio.Event(), 0.001, 0.002), HANG_S)

    assert (result, len(tries)) == ("connected", 3)


async def test_a_stop_ends_the_wait_at_once() -> None:
    stopping = asyncio.Event()

    async def attempt() -> None:
        stopping.set()
        raise BrokerUnavailableError("down")

    with pytest.raises(Stopped):
        await asyncio.wait_for(until_it_works(attempt, "test", stopping, first_s=60.0), HANG_S)


async def test_an_error_that_is_not_ours_is_a_bug_and_propagates() -> None:
    async def attempt() -> None:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        await until_it_works(attempt, "test", asyncio.Event())
