"""Slots and inference turns: realtime batches get a slot of their own and infer before bulk that waits."""

from __future__ import annotations

import asyncio

from consumer.slots import Claim, Slots, Turns

BOUND_S = 5.0  # a bound against a hang, never a timing assertion


async def _never() -> None:
    await asyncio.Event().wait()


async def _at_once() -> None:
    return None


async def test_a_free_shared_slot_is_taken_first() -> None:
    slots = Slots(2)
    assert await slots.take(_at_once) == Claim(shared=1)


async def test_with_the_shared_slots_busy_a_waiting_realtime_frame_gets_the_realtime_slot() -> None:
    slots = Slots(1)
    bulk = await slots.take(_never)
    realtime = await asyncio.wait_for(slots.take(_at_once), BOUND_S)
    assert realtime == Claim(realtime=True)
    assert realtime.realtime_only
    # Both busy now: the next taker waits until one is handed back.
    waiting = asyncio.ensure_future(slots.take(_at_once))
    await asyncio.sleep(0)
    assert not waiting.done()
    slots.release(bulk)
    assert await asyncio.wait_for(waiting, BOUND_S) == Claim(shared=1)


async def test_without_realtime_frames_a_taker_waits_for_a_shared_slot() -> None:
    slots = Slots(1)
    first = await slots.take(_never)
    waiting = asyncio.ensure_future(slots.take(_never))
    await asyncio.sleep(0)
    assert not waiting.done()
    slots.release(first)
    assert await asyncio.wait_for(waiting, BOUND_S) == Claim(shared=1)


async def test_a_cancelled_take_holds_no_slot() -> None:
    slots = Slots(1)
    first = await slots.take(_never)
    waiting = asyncio.ensure_future(slots.take(_never))
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    slots.release(first)
    assert await asyncio.wait_for(slots.take(_never), BOUND_S) == Claim(shared=1)


async def test_a_redelivery_widens_its_claim_to_every_slot() -> None:
    slots = Slots(2)
    claim = await slots.take(_never)
    await asyncio.wait_for(slots.take_all(claim), BOUND_S)
    assert claim == Claim(shared=2, realtime=True)
    realtime = asyncio.ensure_future(slots.take(_at_once))
    await asyncio.sleep(0)
    assert not realtime.done(), "nothing may run beside a redelivery, realtime included"
    slots.release(claim)
    assert await asyncio.wait_for(realtime, BOUND_S) == Claim(shared=1)


async def _take_turn(turns: Turns, urgent: bool, name: str, order: list[str], hold: asyncio.Event) -> None:
    async with turns.turn(urgent):
        order.append(name)
        await hold.wait()


async def test_realtime_infers_before_bulk_that_waits_and_each_lane_keeps_its_order() -> None:
    turns, hold = Turns(), asyncio.Event()
    order: list[str] = []
    running = asyncio.ensure_future(_take_turn(turns, False, "bulk-running", order, hold))
    await asyncio.sleep(0)
    waiters = [
        asyncio.ensure_future(_take_turn(turns, urgent, name, order, hold))
        for urgent, name in ((False, "bulk-1"), (False, "bulk-2"), (True, "realtime-1"), (True, "realtime-2"))
    ]
    await asyncio.sleep(0)
    assert order == ["bulk-running"]
    hold.set()
    await asyncio.wait_for(asyncio.gather(running, *waiters), BOUND_S)
    assert order == ["bulk-running", "realtime-1", "realtime-2", "bulk-1", "bulk-2"]


async def test_a_cancelled_waiter_gives_up_its_turn() -> None:
    turns, hold = Turns(), asyncio.Event()
    order: list[str] = []
    running = asyncio.ensure_future(_take_turn(turns, False, "running", order, hold))
    await asyncio.sleep(0)
    gone = asyncio.ensure_future(_take_turn(turns, True, "gone", order, hold))
    after = asyncio.ensure_future(_take_turn(turns, False, "after", order, hold))
    await asyncio.sleep(0)
    gone.cancel()
    hold.set()
    await asyncio.wait_for(asyncio.gather(running, after), BOUND_S)
    assert order == ["running", "after"]
    async with turns.turn(False):  # and the turns are free again
        pass
