"""Per-lane buffers: realtime drops its oldest, bulk makes the caller wait and then raises, order holds."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from producer.buffer import FrameBuffers
from shared.errors import PublishTimeoutError


@dataclass
class Item:
    seq: int


def buffers(realtime: int = 3, bulk: int = 2) -> FrameBuffers[Item]:
    return FrameBuffers(realtime, bulk)


async def test_a_full_realtime_buffer_drops_its_oldest_frames() -> None:
    held = buffers(realtime=3)
    dropped = [d.seq for i in range(5) for d in held.admit_realtime(Item(i))]

    assert dropped == [0, 1]
    assert [held.pop_next() for _ in range(3)] == [
        ("realtime", Item(2)),
        ("realtime", Item(3)),
        ("realtime", Item(4)),
    ]
    assert held.pop_next() is None


async def test_a_full_bulk_buffer_raises_after_its_timeout_and_keeps_what_it_held() -> None:
    held = buffers(bulk=2)
    await held.admit_bulk(Item(0), timeout=1)
    await held.admit_bulk(Item(1), timeout=1)

    with pytest.raises(PublishTimeoutError, match=r"bulk buffer full \(2 frames\) for 0.05 s"):
        await held.admit_bulk(Item(2), timeout=0.05)
    assert held.held("bulk") == 2


async def test_a_bulk_caller_waiting_for_room_gets_in_once_a_frame_leaves() -> None:
    held = buffers(bulk=1)
    await held.admit_bulk(Item(0), timeout=1)
    waiting = asyncio.create_task(held.admit_bulk(Item(1), timeout=10))
    await asyncio.sleep(0)
    assert not waiting.done()

    assert held.pop_next() == ("bulk", Item(0))
    await asyncio.wait_for(waiting, 5)
    assert held.pop_next() == ("bulk", Item(1))


async def test_realtime_is_sent_before_bulk_and_a_resend_goes_back_to_its_place() -> None:
    held = buffers(realtime=5, bulk=5)
    await held.admit_bulk(Item(1), timeout=1)
    await held.admit_bulk(Item(3), timeout=1)
    held.admit_realtime(Item(2))
    held.requeue("bulk", Item(0))

    order = [held.pop_next() for _ in range(4)]

    assert order == [("realtime", Item(2)), ("bulk", Item(0)), ("bulk", Item(1)), ("bulk", Item(3))]


async def test_the_sender_waits_while_both_lanes_are_empty() -> None:
    held = buffers()
    waiter = asyncio.create_task(held.wait_not_empty())
    await asyncio.sleep(0)
    assert not waiter.done()

    held.admit_realtime(Item(0))
    await asyncio.wait_for(waiter, 5)
    assert held.total() == 1
    assert held.drain() == [("realtime", Item(0))]
    assert held.total() == 0
