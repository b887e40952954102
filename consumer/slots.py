"""Who may start a batch now, and who infers next: what keeps realtime fast behind a deep bulk backlog.

Two things made a realtime frame wait for bulk work (docs/scaling.md, lane isolation): every slot for a batch
in flight held a bulk batch, so the realtime frame was not even decoded until one ended; and the inference
thread took batches in the order they were decoded, so it then waited for the bulk batch queued ahead.
:class:`Slots` keeps one slot for realtime batches beside the shared ones, and :class:`Turns` lets a realtime
batch infer before any bulk batch still waiting. A realtime frame then waits at most for the one inference
already running.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass


@dataclass
class Claim:
    """The slots one batch holds until it is settled."""

    shared: int = 0
    realtime: bool = False

    @property
    def realtime_only(self) -> bool:
        """Only the realtime slot: the batch must carry realtime frames and nothing else."""
        return self.realtime and not self.shared


class Slots:
    """``shared`` slots for batches of any lane and one of realtime's own; a redelivery takes them all, so
    that if it kills the process no neighbour dies with it."""

    def __init__(self, shared: int) -> None:
        self._count = shared
        self._shared = asyncio.Semaphore(shared)
        self._realtime = asyncio.Semaphore(1)

    async def take(self, realtime_waiting: Callable[[], Awaitable[None]]) -> Claim:
        """A shared slot when one is free; else whichever comes first, a shared slot or the realtime slot
        once ``realtime_waiting()`` says realtime frames wait."""
        if not self._shared.locked():
            await self._shared.acquire()
            return Claim(shared=1)
        shared = asyncio.ensure_future(self._shared.acquire())
        realtime = asyncio.ensure_future(self._realtime_turn(realtime_waiting))
        won = False
        try:
            await asyncio.wait({shared, realtime}, return_when=asyncio.FIRST_COMPLETED)
            won = True
        finally:
            shared.cancel()
            realtime.cancel()
            await asyncio.gather(shared, realtime, return_exceptions=True)
            got_shared, got_realtime = not shared.cancelled(), not realtime.cancelled()
            # Both may finish in the same step: keep the shared slot. Cancelled here: keep neither.
            if got_realtime and (got_shared or not won):
                self._realtime.release()
            if got_shared and not won:
                self._shared.release()
        return Claim(shared=1) if got_shared else Claim(realtime=True)

    async def _realtime_turn(self, realtime_waiting: Callable[[], Awaitable[None]]) -> None:
        await realtime_waiting()
        await self._realtime.acquire()

    async def take_all(self, claim: Claim) -> None:
        """Widen ``claim`` to every slot (shared first, then realtime: the order every taker uses)."""
        while claim.shared < self._count:
            await self._shared.acquire()
            claim.shared += 1
        if not claim.realtime:
            await self._realtime.acquire()
            claim.realtime = True

    def release(self, claim: Claim) -> None:
        for _ in range(claim.shared):
            self._shared.release()
        if claim.realtime:
            self._realtime.release()
        claim.shared, claim.realtime = 0, False


class Turns:
    """The inference thread's queue: one batch at a time; realtime batches go before bulk batches that wait,
    each in arrival order."""

    def __init__(self) -> None:
        self._busy = False
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    def waiting(self) -> int:
        """Batches waiting for the inference thread (cancelled ones not yet skipped included)."""
        return len(self._waiting)

    @contextlib.asynccontextmanager
    async def turn(self, urgent: bool) -> AsyncIterator[None]:
        if self._busy:
            handed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (0 if urgent else 1, next(self._arrivals), handed))
            try:
                await handed
            except asyncio.CancelledError:
                if handed.done() and not handed.cancelled():
                    self._hand_on()  # handed the turn in the same step as the cancel: pass it on
                raise
        else:
            self._busy = True
        try:
            yield
        finally:
            self._hand_on()

    def _hand_on(self) -> None:
        while self._waiting:
            _, _, handed = heapq.heappop(self._waiting)
            if not handed.done():  # a cancelled waiter is skipped
                handed.set_result(None)
                return
        self._busy = False
