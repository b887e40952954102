"""Acks per channel, with ``multiple=true`` only over the lowest contiguous run of settled tags.

``basic.ack(multiple=true)`` acks every lower unacked tag on the channel, so it may only be used once every
lower tag is settled. Requeues go out at once, one tag each, and unblock the run behind them.
"""

from __future__ import annotations

from shared.broker.aio import Delivery


class Acker:
    """Tracks the deliveries of one channel in tag order; a new channel gets a new Acker."""

    def __init__(self) -> None:
        self._held: dict[int, Delivery] = {}  # insertion order is tag order on one channel
        self._settled: set[int] = set()
        self.ack_frames = 0

    def __len__(self) -> int:
        return len(self._held)

    def track(self, delivery: Delivery) -> None:
        self._held[delivery.delivery_tag] = delivery

    async def ack(self, delivery: Delivery, flush: bool = True) -> None:
        """Settle one delivery; ``flush=False`` leaves the ack frame for :meth:`flush`, so a batch settled in
        order goes out as one ``multiple=true`` frame instead of one frame a message."""
        if delivery.delivery_tag in self._held:
            self._settled.add(delivery.delivery_tag)
            if flush:
                await self._flush()

    async def flush(self) -> None:
        await self._flush()

    async def requeue(self, delivery: Delivery) -> None:
        if self._held.pop(delivery.delivery_tag, None) is not None:
            await delivery.requeue()
            await self._flush()

    async def requeue_all(self) -> int:
        """Requeue every delivery not yet acked (shutdown, sink outage); returns how many."""
        pending = [d for tag, d in self._held.items() if tag not in self._settled]
        for delivery in pending:
            await self.requeue(delivery)
        await self._flush()  # what was settled without a flush yet
        return len(pending)

    async def _flush(self) -> None:
        run: list[int] = []
        for tag in self._held:
            if tag not in self._settled:
                break
            run.append(tag)
        if not run:
            return
        last = self._held[run[-1]]
        for tag in run:  # before the await: a concurrent flush must not ack the same run again
            del self._held[tag]
            self._settled.discard(tag)
        self.ack_frames += 1
        await last.ack(multiple=len(run) > 1)
