"""Forming batches from received messages: realtime first and alone, redeliveries alone, at most the limit.

The batcher holds admitted jobs in lanes and hands out one batch at a time: up to :class:`BatchLimit`
jobs, waiting at most ``max_wait_s`` after the first for more. A redelivered job (the broker handed it out
before, so a consumer may have died with it in hand) is always a batch of its own, so a message that kills
the process takes no neighbour down with it (docs/message-flow.md). It owns no broker and no sink: what
leaves the batcher without a batch (a drain, an over-held job) is returned to the caller to settle.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable

from consumer.jobs import Job


class BatchLimit:
    """The largest batch the worker forms now: ``max_batch``, halved after an out-of-memory failure, and
    probed back up (doubled) once a cool-down has passed without another one."""

    def __init__(self, max_batch: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_batch = max_batch
        self.current = max_batch
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._calm_from = 0.0

    def shrink(self, failed_size: int) -> None:
        """A batch of ``failed_size`` ran out of memory: form at most half of it for a cool-down."""
        self.current = max(1, min(self.current, failed_size // 2))
        self._calm_from = self._clock() + self._cooldown_s

    def succeeded(self, size: int) -> None:
        """A batch of ``size`` went through: once calm and at the limit, probe twice as big."""
        if self.current < self.max_batch and size >= self.current and self._clock() >= self._calm_from:
            self.current = min(self.max_batch, self.current * 2)
            self._calm_from = self._clock() + self._cooldown_s


class Batcher:
    def __init__(self, limit: BatchLimit, max_wait_s: float) -> None:
        self.limit = limit
        self._max_wait_s = max_wait_s
        self._realtime: deque[Job] = deque()
        self._bulk: deque[Job] = deque()  # bulk, retries and intake, in arrival order
        self._alone: deque[Job] = deque()  # redeliveries: one a batch
        self._work = asyncio.Event()
        self._realtime_work = asyncio.Event()

    def __len__(self) -> int:
        return len(self._realtime) + len(self._bulk) + len(self._alone)

    def add(self, job: Job) -> None:
        if job.redelivered:
            self._alone.append(job)
        elif job.task is not None and job.task.lane == "realtime":
            self._realtime.append(job)
            self._realtime_work.set()
        else:
            self._bulk.append(job)
        self._work.set()

    async def realtime_waiting(self) -> None:
        """Return once a realtime frame waits for a batch."""
        while not self._realtime:
            self._realtime_work.clear()
            await self._realtime_work.wait()

    async def next_batch(self, realtime_only: bool = False) -> list[Job]:
        """The next batch: a redelivery alone, else up to the limit, realtime first, waiting at most
        ``max_wait_s`` after the first job for the batch to fill. ``realtime_only``: realtime frames at
        once, or an empty batch when none waits (the caller holds only the realtime slot)."""
        if realtime_only and not self._realtime:
            return []
        while not self:
            self._work.clear()
            await self._work.wait()
        if self._alone and not self._realtime:
            return [self._alone.popleft()]
        # A realtime batch carries realtime frames only: topped up with bulk it would infer a full batch,
        # and a realtime frame behind a deep bulk backlog waited for that too (docs/scaling.md).
        realtime_only = bool(self._realtime)
        batch: list[Job] = []
        deadline = time.monotonic() + self._max_wait_s
        while len(batch) < self.limit.current:
            job = self._next_shared(realtime_only)
            if job is not None:
                batch.append(job)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not batch:
                break
            self._work.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._work.wait(), remaining)
        return batch or [self._alone.popleft()]

    def _next_shared(self, realtime_only: bool = False) -> Job | None:
        if self._realtime:
            return self._realtime.popleft()
        if self._bulk and not realtime_only:
            return self._bulk.popleft()
        return None

    def take_all(self) -> list[Job]:
        """Every job still waiting (a drain or a pause hands them back)."""
        waiting = [*self._realtime, *self._bulk, *self._alone]
        for lane in (self._realtime, self._bulk, self._alone):
            lane.clear()
        return waiting

    def take_overheld(self, max_hold_s: float, now: float | None = None) -> list[Job]:
        """Jobs that waited longer than ``max_hold_s`` without starting (well under consumer_timeout)."""
        now = time.monotonic() if now is None else now
        stale: list[Job] = []
        for lane in (self._realtime, self._bulk, self._alone):
            old = [j for j in lane if j.held_for(now) > max_hold_s]
            for job in old:
                lane.remove(job)
            stale.extend(old)
        return stale
