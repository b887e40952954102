"""Per-lane buffers of frames waiting for the broker: bounded, oldest first, realtime served first.

While the broker is unreachable or has blocked the connection, frames wait here. A full realtime buffer
drops its oldest frame (a stale frame is worth less than a fresh one); a full bulk buffer makes the caller
wait for room, and :class:`~shared.errors.PublishTimeoutError` once that takes too long.
"""

from __future__ import annotations

import asyncio
import heapq
from typing import Generic, Protocol, TypeVar

from shared.errors import PublishTimeoutError
from shared.settings import Lane


class Sequenced(Protocol):
    """Anything with a submission number: the buffers keep frames in that order, resends included."""

    @property
    def seq(self) -> int: ...


T = TypeVar("T", bound=Sequenced)

SEND_ORDER: tuple[Lane, ...] = ("realtime", "bulk")


class LaneBuffer(Generic[T]):
    """A bounded heap by submission order: a resent frame goes back to its original place."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._heap: list[tuple[int, T]] = []

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def full(self) -> bool:
        return len(self._heap) >= self.capacity

    def push(self, item: T) -> None:
        heapq.heappush(self._heap, (item.seq, item))

    def pop_oldest(self) -> T:
        return heapq.heappop(self._heap)[1]

    def drain(self) -> list[T]:
        items, self._heap = sorted(self._heap, key=lambda entry: entry[0]), []
        return [item for _, item in items]


class FrameBuffers(Generic[T]):
    """Both lanes' buffers, and the events that wake the sender and callers waiting for room."""

    def __init__(self, realtime_capacity: int, bulk_capacity: int) -> None:
        self._lanes: dict[Lane, LaneBuffer[T]] = {
            "realtime": LaneBuffer(realtime_capacity),
            "bulk": LaneBuffer(bulk_capacity),
        }
        self._total = 0
        self._not_empty = asyncio.Event()
        self._room = asyncio.Event()

    def held(self, lane: Lane) -> int:
        return len(self._lanes[lane])

    def total(self) -> int:
        return self._total

    def admit_realtime(self, item: T) -> list[T]:
        """Add a new realtime frame; returns the oldest frames pushed out to make room for it."""
        buffer = self._lanes["realtime"]
        dropped = [buffer.pop_oldest() for _ in range(len(buffer) - buffer.capacity + 1)]
        self._total -= len(dropped)
        self._put("realtime", item)
        return dropped

    async def admit_bulk(self, item: T, timeout: float) -> None:
        """Add a new bulk frame once there is room; :class:`PublishTimeoutError` after ``timeout``."""
        buffer = self._lanes["bulk"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while buffer.full:
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), max(deadline - loop.time(), 0))
            except TimeoutError:
                raise PublishTimeoutError(
                    f"bulk buffer full ({buffer.capacity} frames) for {timeout:g} s: "
                    "the broker is unreachable, blocked or refusing publishes"
                ) from None
        self._put("bulk", item)

    def requeue(self, lane: Lane, item: T) -> None:
        """Put back a frame that must be sent again; resends may exceed the capacity for a moment."""
        self._put(lane, item)

    async def wait_not_empty(self) -> None:
        while not self._total:
            self._not_empty.clear()
            await self._not_empty.wait()

    def pop_next(self) -> tuple[Lane, T] | None:
        """The next frame to send, realtime before bulk; None when both are empty."""
        for lane in SEND_ORDER:
            buffer = self._lanes[lane]
            if buffer:
                item = buffer.pop_oldest()
                self._total -= 1
                if lane == "bulk":
                    self._room.set()
                return lane, item
        return None

    def drain(self) -> list[tuple[Lane, T]]:
        """Take every frame out (closing): the caller fails their outcomes."""
        items = [(lane, item) for lane, buffer in self._lanes.items() for item in buffer.drain()]
        self._total = 0
        self._room.set()
        return items

    def _put(self, lane: Lane, item: T) -> None:
        self._lanes[lane].push(item)
        self._total += 1
        self._not_empty.set()
