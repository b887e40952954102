"""The async publisher: frames in, task ids out once the broker confirmed them.

One sender task moves frames from the per-lane buffers onto a confirm channel, keeping up to
``max_in_flight`` publishes unconfirmed at once (one awaited round trip per frame would cap the rate at a
few hundred a second). Every frame ends one way: confirmed, returned (unroutable), nacked past its retries,
dropped on purpose (realtime only) or failed at close; the caller's future says which.

A lost connection is reopened in the background and every frame that was in flight goes back to its place
in the buffer and is sent again: the broker may hold it twice, and the task id dedupes that downstream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import random
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from producer.buffer import FrameBuffers
from producer.metrics import ProducerMetrics
from shared.broker.publishing import ConfirmChannel
from shared.errors import (
    BrokerError,
    BrokerUnavailableError,
    FrameDroppedError,
    FrameRejectedError,
    PublishNackedError,
    PublishTimeoutError,
    TaskValidationError,
    UnroutableError,
)
from shared.frames import inspect_frame
from shared.schema import (
    Envelope,
    Task,
    deterministic_task_id,
    frame_task_id,
    realtime_deadline,
    routing_key,
    stamp_published,
)
from shared.settings import Lane, ProducerSettings, mask_url
from shared.topology import EXCHANGE_FRAMES

logger = logging.getLogger(__name__)

# A wait for the broker longer than this is trouble (unreachable or blocked), not ordinary flow control.
STALL_AFTER_S = 0.25
RECONNECT_FIRST_S = 0.1
RECONNECT_MAX_S = 5.0
# A frame whose sends keep dying with the connection is given up after this many (a poison message that
# makes the broker close the channel would otherwise be resent forever).
MAX_SENDS = 20


def log_ids(task: Task) -> dict[str, str]:
    """``extra`` of a per-frame log line: its task id and trace id, as the consumer's lines carry them."""
    return {"task_id": str(task.task_id), "trace_id": task.trace_id}


class FrameRefusedError(FrameRejectedError):
    """A frame refused before publishing (bad image); ``task`` is the task it would have been."""

    def __init__(self, message: str, task: Task) -> None:
        super().__init__(message)
        self.task = task


@dataclasses.dataclass(eq=False)
class _Outgoing:
    """A frame on its way: its place in line, its message, and the future its caller holds."""

    seq: int
    lane: Lane
    task: Task
    envelope: Envelope
    outcome: asyncio.Future[uuid.UUID]
    sends: int = 0


class _StallMeter:
    """Times the stretches in which frames wait for an unreachable or blocked broker."""

    def __init__(self, metrics: ProducerMetrics) -> None:
        self._metrics = metrics
        self._since: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def stalled(self) -> bool:
        return self._since is not None

    async def wait(self, awaitable: Any) -> Any:
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._timer = loop.call_later(STALL_AFTER_S, self._begin, started)
        try:
            return await awaitable
        finally:
            self._timer.cancel()
            self.end()

    def end(self) -> None:
        if self._since is None:
            return
        seconds = asyncio.get_running_loop().time() - self._since
        self._since = None
        self._metrics.blocked(seconds)
        logger.info("Broker took frames again after %.1f s", seconds)

    def _begin(self, started: float) -> None:
        self._since = started
        logger.warning("Broker unreachable or blocked: frames are being buffered")


class _Link:
    """The current confirm channel, reopened in the background whenever the connection dies."""

    def __init__(self, settings: ProducerSettings, name: str, exchange: str) -> None:
        self._settings = settings
        self._name = name
        self._exchange = exchange
        self._channel: ConfirmChannel | None = None
        self._up = asyncio.Event()
        self._closing = False
        self._background: set[asyncio.Task[None]] = set()

    @property
    def channel(self) -> ConfirmChannel | None:
        return self._channel

    async def open(self) -> None:
        """The first connection: fails fast, so a wrong URL or a missing topology is reported at once."""
        self._attach(await self._connect())

    async def ready(self) -> ConfirmChannel:
        while self._channel is None:
            await self._up.wait()
        return self._channel

    def lost(self, channel: ConfirmChannel, reason: str) -> None:
        """``channel`` died (it may already have been replaced): reconnect once."""
        if channel is not self._channel or self._closing:
            return
        logger.warning(
            "Connection to the broker lost (%s): reconnecting, unconfirmed frames will be resent", reason
        )
        self._channel = None
        self._up.clear()
        self._spawn(channel.close())
        self._spawn(self._reconnect())

    async def close(self) -> None:
        self._closing = True
        background = list(self._background)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
        self._channel = None

    async def _connect(self) -> ConfirmChannel:
        return await ConfirmChannel.open(
            self._settings.amqp_url, self._name, self._exchange, timeout=self._settings.confirm_timeout_s
        )

    async def _reconnect(self) -> None:
        delay = RECONNECT_FIRST_S
        while True:
            try:
                channel = await self._connect()
            except BrokerError as error:
                # Jitter: gateways that lost the same node must not all knock on the next one together.
                wait = delay + random.uniform(0, RECONNECT_FIRST_S)
                logger.info("Reconnect to %s failed (%s); next try in %.1f s", self._url, error, wait)
                await asyncio.sleep(wait)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            logger.info("Reconnected to %s", mask_url(channel.url) or self._url)
            self._attach(channel)
            return

    @property
    def _url(self) -> str:
        return mask_url(self._settings.amqp_url)

    def _attach(self, channel: ConfirmChannel) -> None:
        self._channel = channel
        channel.on_close(lambda reason: self.lost(channel, reason))
        self._up.set()

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class AsyncPublisher:
    """Publishes frames to ``detfleet.frames`` with confirms and ``mandatory``; see the module docstring.

    Use as ``async with AsyncPublisher(settings) as publisher:``; :meth:`publish` returns a frame's task id
    once confirmed, :meth:`submit` returns at once with a future of it (what a fast loop wants).
    """

    def __init__(
        self,
        settings: ProducerSettings,
        *,
        metrics: ProducerMetrics | None = None,
        deterministic_ids: bool = False,
        connection_name: str | None = None,
        exchange: str = EXCHANGE_FRAMES,
    ) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else ProducerMetrics()
        self._deterministic_ids = deterministic_ids
        self._link = _Link(
            settings, connection_name or f"detfleet-producer:{settings.producer_name}", exchange
        )
        self._buffers: FrameBuffers[_Outgoing] = FrameBuffers(settings.realtime_buffer, settings.bulk_buffer)
        self.metrics.watch_buffers(self._buffers.held)
        self._stall = _StallMeter(self.metrics)
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self._seq = itertools.count()
        self._outstanding: set[asyncio.Future[uuid.UUID]] = set()
        self._deliveries: dict[asyncio.Task[None], _Outgoing] = {}
        self._sender: asyncio.Task[None] | None = None
        self._closed = False

    async def __aenter__(self) -> AsyncPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect (or raise :class:`BrokerUnavailableError`/:class:`BrokerError`) and start sending."""
        await self._link.open()
        self._sender = asyncio.get_running_loop().create_task(self._send_loop(), name="detfleet-publisher")

    async def publish(
        self,
        frame: bytes,
        *,
        camera: str,
        site: str,
        lane: Lane | None = None,
        captured_at: datetime | None = None,
        deadline: datetime | None = None,
        trace_id: str | None = None,
        key: str | None = None,
        timeout: float | None = None,
    ) -> uuid.UUID:
        """Publish one frame and return its task id once the broker confirmed it.

        ``key`` names the frame within its camera (a file's path and content hash, a video's identity and
        frame index): the task id is then derived from it, so the same frame sent again is the same task.
        Without a key the id is random, or derived from the capture time with ``deterministic_ids``.

        Raises :class:`FrameRejectedError` (bad image), :class:`UnroutableError`, :class:`PublishNackedError`
        (bulk lane full past the retries), :class:`FrameDroppedError` (realtime, pushed out) or
        :class:`PublishTimeoutError` (no confirm within ``timeout``, default ``confirm_timeout_s`` plus the
        nack backoff; the frame stays queued and may still be delivered).
        """
        item = await self._admit(frame, camera, site, lane, captured_at, deadline, trace_id, key)
        wait = timeout if timeout is not None else self.confirm_wait_s()
        try:
            return await asyncio.wait_for(asyncio.shield(item.outcome), wait)
        except TimeoutError:
            raise PublishTimeoutError(
                f"frame {item.task.task_id}: no confirm within {wait:g} s (broker unreachable or blocked?); "
                "it stays queued and may still be delivered"
            ) from None

    async def submit(
        self,
        frame: bytes,
        *,
        camera: str,
        site: str,
        lane: Lane | None = None,
        captured_at: datetime | None = None,
        deadline: datetime | None = None,
        trace_id: str | None = None,
        key: str | None = None,
    ) -> asyncio.Future[uuid.UUID]:
        """Queue one frame; the future resolves to its task id once confirmed (or to the error of
        :meth:`publish`). Waits only while a full bulk buffer has no room, up to ``bulk_block_timeout_s``."""
        item = await self._admit(frame, camera, site, lane, captured_at, deadline, trace_id, key)
        return item.outcome

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every frame queued so far has its outcome, or raise :class:`PublishTimeoutError`."""
        pending = set(self._outstanding)
        if not pending:
            return
        _, not_done = await asyncio.wait(pending, timeout=timeout)
        if not_done:
            raise PublishTimeoutError(f"{len(not_done)} frames still unconfirmed after {timeout:g} s")

    async def close(self, timeout: float | None = None) -> None:
        """Flush for up to ``timeout`` (default ``confirm_timeout_s``), then stop; frames still without an
        outcome fail with :class:`PublishTimeoutError`."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.flush(self.settings.confirm_timeout_s if timeout is None else timeout)
        except PublishTimeoutError as error:
            logger.warning("Closing with frames unconfirmed: %s", error)
        await self._stop_sending()
        self._stall.end()
        await self._link.close()

    @property
    def held_up(self) -> bool:
        """True while the broker is unreachable or blocked: frames now would wait in the buffer. An HTTP
        gateway answers 503 then instead of holding its client."""
        return self._closed or self._stall.stalled or self._link.channel is None

    @property
    def unconfirmed(self) -> int:
        """Frames queued or in flight that have no outcome yet."""
        return len(self._outstanding)

    @property
    def in_flight(self) -> int:
        """Frames sent and waiting for their confirm (or backing off after a nack)."""
        return len(self._deliveries)

    # -- admission -------------------------------------------------------------------------------------

    async def _admit(
        self,
        frame: bytes,
        camera: str,
        site: str,
        lane: Lane | None,
        captured_at: datetime | None,
        deadline: datetime | None,
        trace_id: str | None,
        key: str | None,
    ) -> _Outgoing:
        if self._closed or self._sender is None:
            raise BrokerUnavailableError("publisher is not running (start it, or it was closed)")
        lane = lane or self.settings.lane
        item = self._outgoing(frame, self._task(lane, site, camera, captured_at, deadline, trace_id, key))
        stalled = self._stall.stalled or self._link.channel is None
        if lane == "realtime":
            for old in self._buffers.admit_realtime(item):
                self._drop(old, "buffer full", "pushed out of the full realtime buffer")
        else:
            try:
                await self._buffers.admit_bulk(item, self.settings.bulk_block_timeout_s)
            except BaseException:
                item.outcome.cancel()
                raise
        self.metrics.published(lane)
        if stalled:
            self.metrics.buffered(lane)
        return item

    def _task(
        self,
        lane: Lane,
        site: str,
        camera: str,
        captured_at: datetime | None,
        deadline: datetime | None,
        trace_id: str | None,
        key: str | None,
    ) -> Task:
        captured = captured_at or datetime.now(UTC)
        if lane == "realtime" and deadline is None:
            deadline = realtime_deadline(captured, self.settings.realtime_deadline_ms)
        try:
            routing_key(lane, site, camera)
            task_id = self._task_id(site, camera, captured, key)
            return Task(
                task_id=task_id,
                lane=lane,
                site=site,
                camera_id=camera,
                captured_at=captured,
                # One trace per frame unless the gateway carries its own.
                trace_id=trace_id or task_id.hex,
                deadline=deadline,
                producer=self.settings.producer_name,
            )
        except ValidationError as error:
            first = error.errors()[0]
            raise TaskValidationError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        except ValueError as error:
            raise TaskValidationError(str(error)) from None

    def _task_id(self, site: str, camera: str, captured: datetime, key: str | None) -> uuid.UUID:
        if key is not None:
            return frame_task_id(site, camera, key)
        if self._deterministic_ids:
            return deterministic_task_id(site, camera, captured)
        return uuid.uuid4()

    def _outgoing(self, frame: bytes, task: Task) -> _Outgoing:
        try:
            inspect_frame(frame)
        except FrameRejectedError as error:
            self.metrics.refused("bad image")
            raise FrameRefusedError(str(error), task) from None
        envelope = task.to_envelope(frame)
        outcome: asyncio.Future[uuid.UUID] = asyncio.get_running_loop().create_future()
        self._outstanding.add(outcome)
        outcome.add_done_callback(self._forget)
        return _Outgoing(next(self._seq), task.lane, task, envelope, outcome)

    def _forget(self, outcome: asyncio.Future[uuid.UUID]) -> None:
        self._outstanding.discard(outcome)
        if not outcome.cancelled():
            # Marks the error as seen: a gateway that fires and forgets must not get asyncio's
            # "exception was never retrieved" noise; the metrics count every outcome.
            outcome.exception()

    def confirm_wait_s(self) -> float:
        """How long :meth:`publish` waits for a confirm: the confirm timeout plus the worst nack backoff."""
        backoff = self.settings.nack_backoff_s * ((1 << self.settings.nack_retries) - 1) * 1.5
        return self.settings.confirm_timeout_s + backoff

    # -- sending ---------------------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        while True:
            await self._buffers.wait_not_empty()
            if self._link.channel is None:
                await self._stall.wait(self._link.ready())
            if self._slots.locked():
                await self._stall.wait(self._slots.acquire())
            else:
                await self._slots.acquire()
            self._start_delivery()

    def _start_delivery(self) -> None:
        """Send the next frame on the current channel; the caller holds a window slot for it."""
        channel = self._link.channel
        popped = self._buffers.pop_next() if channel is not None else None
        if channel is None or popped is None:
            self._slots.release()
            return
        _, item = popped
        envelope = self._envelope_now(item)
        if envelope is None:
            self._slots.release()
            self._drop(item, "expired", "its deadline passed while it waited for the broker")
            return
        delivery = asyncio.get_running_loop().create_task(self._deliver(item, envelope, channel))
        self._deliveries[delivery] = item
        delivery.add_done_callback(self._delivery_done)

    def _envelope_now(self, item: _Outgoing) -> Envelope | None:
        """The message to send now, stamped with this moment as its publish time (the consumer's queue
        wait starts here, not when the frame entered the buffer); a realtime frame's expiration is what
        is left of its deadline."""
        now = datetime.now(UTC)
        if item.lane != "realtime" or item.task.deadline is None:
            return stamp_published(item.envelope, now)
        left_ms = int((item.task.deadline - now).total_seconds() * 1000)
        if left_ms <= 0:
            return None
        return stamp_published(item.task.to_envelope(item.envelope.body, expiration_ms=left_ms), now)

    def _delivery_done(self, delivery: asyncio.Task[None]) -> None:
        self._deliveries.pop(delivery, None)
        self._slots.release()

    async def _deliver(self, item: _Outgoing, envelope: Envelope, channel: ConfirmChannel) -> None:
        item.sends += 1
        try:
            await self._publish_confirmed(item, envelope, channel)
        except UnroutableError as error:
            self.metrics.returned(item.lane)
            self._fail(item, error)
        except PublishNackedError as error:
            self._fail(item, error)
        except BrokerError as error:
            self._link.lost(channel, str(error))
            self._resend(item, error)
        else:
            self.metrics.confirmed(item.lane)
            if not item.outcome.done():
                item.outcome.set_result(item.task.task_id)

    async def _publish_confirmed(self, item: _Outgoing, envelope: Envelope, channel: ConfirmChannel) -> None:
        # The first try runs outside tenacity: a retry controller per frame costs more than the publish.
        try:
            await channel.publish(envelope)
        except PublishNackedError as error:
            self.metrics.nacked(item.lane)
            if not self.settings.nack_retries:
                raise self._nacked_error(item, 1) from error
            await self._retry_nacked(item, envelope, channel, error)

    async def _retry_nacked(
        self, item: _Outgoing, envelope: Envelope, channel: ConfirmChannel, first: PublishNackedError
    ) -> None:
        """Back off and publish again while the broker nacks (bulk lane full); the nack already
        received counts as the first attempt. Holding the window slot meanwhile slows the whole sender
        down: that is the backpressure."""
        already: list[PublishNackedError] = [first]
        backoff = self.settings.nack_backoff_s

        async def attempt() -> None:
            if already:
                raise already.pop()
            try:
                await channel.publish(envelope)
            except PublishNackedError:
                self.metrics.nacked(item.lane)
                raise

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(PublishNackedError),
            stop=stop_after_attempt(self.settings.nack_retries + 1),
            wait=wait_exponential(multiplier=backoff) + wait_random(0, backoff / 2),
            before_sleep=lambda state: self._log_backoff(item, state),
            reraise=True,
        )
        try:
            await retrying(attempt)
        except PublishNackedError as error:
            raise self._nacked_error(item, self.settings.nack_retries + 1) from error

    def _nacked_error(self, item: _Outgoing, times: int) -> PublishNackedError:
        return PublishNackedError(
            f"frame {item.task.task_id}: the broker refused it {times} times ({item.lane} queue full?); "
            "the fleet is pushing back"
        )

    @staticmethod
    def _log_backoff(item: _Outgoing, state: RetryCallState) -> None:
        delay = state.next_action.sleep if state.next_action else 0.0
        logger.info(
            "Frame %s nacked (queue full?): retry %d in %.2f s",
            item.task.task_id,
            state.attempt_number,
            delay,
            extra=log_ids(item.task),
        )

    def _resend(self, item: _Outgoing, error: BrokerError) -> None:
        if item.sends >= MAX_SENDS:
            self._fail(
                item, BrokerError(f"frame {item.task.task_id}: gave up after {item.sends} sends: {error}")
            )
            return
        self.metrics.resent()
        self._buffers.requeue(item.lane, item)

    def _fail(self, item: _Outgoing, error: BaseException) -> None:
        logger.warning("Frame %s not published: %s", item.task.task_id, error, extra=log_ids(item.task))
        if not item.outcome.done():
            item.outcome.set_exception(error)

    def _drop(self, item: _Outgoing, reason: str, why: str) -> None:
        self.metrics.dropped(item.lane, reason)
        logger.debug("Dropped realtime frame %s: %s", item.task.task_id, why, extra=log_ids(item.task))
        if not item.outcome.done():
            item.outcome.set_exception(FrameDroppedError(f"frame {item.task.task_id} dropped: {why}"))

    async def _stop_sending(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
        deliveries = dict(self._deliveries)
        for delivery in deliveries:
            delivery.cancel()
        await asyncio.gather(*deliveries, *([self._sender] if self._sender else []), return_exceptions=True)
        leftover = list(deliveries.values()) + [item for _, item in self._buffers.drain()]
        for item in leftover:
            if not item.outcome.done():
                item.outcome.set_exception(
                    PublishTimeoutError(
                        f"frame {item.task.task_id}: publisher closed before the broker confirmed it"
                    )
                )


__all__ = ["AsyncPublisher", "FrameDroppedError", "FrameRefusedError", "log_ids"]
