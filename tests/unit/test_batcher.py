"""Batch forming without a broker: the batch limit, the wait for a partial batch, realtime first,
redeliveries alone, and the out-of-memory limit that halves and probes back up."""

from __future__ import annotations

import asyncio
import dataclasses

from consumer.batcher import Batcher, BatchLimit
from consumer.jobs import Job
from tests.support.fakes import FakeChannel, lane_queue, task_envelope

HANG_S = 5.0  # a bound against a hang, not a timing assertion


def jobs(channel: FakeChannel, count: int, lane: str = "bulk", redelivered: bool = False) -> list[Job]:
    made = []
    for _ in range(count):
        envelope = dataclasses.replace(task_envelope(lane), redelivered=redelivered)
        made.append(channel.deliver(envelope, lane_queue(lane)))
    return made


def batcher(max_batch: int = 4, max_wait_s: float = 0.0) -> Batcher:
    return Batcher(BatchLimit(max_batch, cooldown_s=30.0), max_wait_s)


async def next_batch(b: Batcher) -> list[Job]:
    return await asyncio.wait_for(b.next_batch(), HANG_S)


async def test_batches_are_cut_at_the_limit_in_arrival_order() -> None:
    b, waiting = batcher(max_batch=4), jobs(FakeChannel(), 10)
    for job in waiting:
        b.add(job)

    sizes = [len(await next_batch(b)) for _ in range(3)]

    assert sizes == [4, 4, 2]
    assert len(b) == 0


async def test_a_partial_batch_waits_for_more_until_max_wait() -> None:
    b, channel = batcher(max_batch=4, max_wait_s=HANG_S), FakeChannel()
    first, *late = jobs(channel, 4)
    b.add(first)
    forming = asyncio.create_task(b.next_batch())
    await asyncio.sleep(0)  # the batcher now waits for more with one job in hand
    assert not forming.done()
    for job in late:
        b.add(job)

    assert await asyncio.wait_for(forming, HANG_S) == [first, *late]


async def test_a_partial_batch_goes_when_max_wait_passes() -> None:
    b, channel = batcher(max_batch=8, max_wait_s=0.01), FakeChannel()
    for job in jobs(channel, 3):
        b.add(job)

    assert len(await next_batch(b)) == 3


async def test_realtime_goes_first_even_when_bulk_arrived_earlier() -> None:
    b, channel = batcher(max_batch=3), FakeChannel()
    bulk = jobs(channel, 3)
    realtime = jobs(channel, 2, lane="realtime")
    for job in [*bulk, *realtime]:
        b.add(job)

    assert await next_batch(b) == realtime
    assert await next_batch(b) == bulk


async def test_a_realtime_batch_is_not_topped_up_with_bulk() -> None:
    """Behind a deep bulk backlog a realtime frame infers in a batch of realtime frames only, so it does
    not pay for a full batch of bulk ones (bench/scale.py's lane isolation)."""
    b, channel = batcher(max_batch=4), FakeChannel()
    bulk = jobs(channel, 4)
    realtime = jobs(channel, 1, lane="realtime")
    for job in [*bulk, *realtime]:
        b.add(job)

    assert await next_batch(b) == realtime
    assert await next_batch(b) == bulk


async def test_a_redelivery_is_a_batch_of_its_own() -> None:
    b, channel = batcher(max_batch=8), FakeChannel()
    fresh = jobs(channel, 3)
    again = jobs(channel, 2, redelivered=True)
    for job in [again[0], *fresh, again[1]]:
        b.add(job)

    batches = [await next_batch(b) for _ in range(3)]

    assert batches == [[again[0]], [again[1]], fresh]


async def test_waiting_and_overheld_jobs_are_handed_back() -> None:
    b, channel = batcher(), FakeChannel()
    old, new = jobs(channel, 1), jobs(channel, 2)
    for job in [*old, *new]:
        b.add(job)
    later = old[0].received_mono + 10

    assert b.take_overheld(max_hold_s=5, now=later) == [*old, *new]
    assert len(b) == 0
    for job in new:
        b.add(job)
    assert b.take_all() == new


def test_out_of_memory_halves_the_limit_for_a_cool_down_then_probes_back_up() -> None:
    now = [0.0]
    limit = BatchLimit(16, cooldown_s=10.0, clock=lambda: now[0])

    limit.shrink(failed_size=16)
    assert limit.current == 8
    limit.shrink(failed_size=8)
    assert limit.current == 4
    limit.succeeded(4)
    assert limit.current == 4  # still cooling down

    now[0] = 11.0
    limit.succeeded(2)
    assert limit.current == 4  # a batch smaller than the limit proves nothing
    limit.succeeded(4)
    assert limit.current == 8  # probing up
    now[0] = 22.0
    limit.succeeded(8)
    assert limit.current == 16
    limit.succeeded(16)
    assert limit.current == 16  # never past max_batch


def test_the_limit_never_drops_below_one() -> None:
    limit = BatchLimit(2, cooldown_s=1.0)
    limit.shrink(1)
    assert limit.current == 1
