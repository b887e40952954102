"""Settling: the one place that writes rows, publishes retry and DLQ copies, acks and requeues.

For a batch whose jobs all have outcomes, :meth:`Settler.settle` reads what the sink holds for their task
ids (only when some outcome is not ok), decides each message's fate once with
:func:`consumer.outcomes.decide`, and carries the actions out in order: write the rows (one transaction),
publish the copies (confirmed), record the confirmed DLQ copies on their rows, ack (one frame per channel).
A step that fails sends the messages it concerns back to the broker untouched: a sink outage requeues the
whole batch (and the caller pauses), a refused copy requeues its message. Nothing is acked whose row was
not committed or whose copy was not confirmed (docs/message-flow.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from consumer.acker import Acker
from consumer.detector.base import ModelInfo
from consumer.jobs import Job, build_row
from consumer.metrics import ConsumerMetrics
from consumer.outcomes import Action, Crashed, Ok, SinkUnavailable, Stored, decide
from consumer.sink import ResultRow, SinkUnavailableError, WriteReport
from shared.errors import BrokerError
from shared.events import ResultEvent
from shared.logs import task_context
from shared.schema import H_ATTEMPT, Envelope, dead_letter_copy
from shared.settings import ConsumerSettings
from shared.topology import EXCHANGE_DLQ, EXCHANGE_RESULTS, Topology

logger = logging.getLogger(__name__)


class Publisher(Protocol):
    """The part of the broker seam settling needs (:class:`shared.broker.aio.Broker`, or a fake)."""

    async def publish(
        self, envelope: Envelope, exchange: str, timeout: float | None = 10.0, mandatory: bool = True
    ) -> None: ...


class ResultStore(Protocol):
    """The part of the sink settling needs (:class:`consumer.sink.Sink`, or a fake)."""

    async def stored(self, task_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Stored]: ...

    async def mark_started(self, task_id: uuid.UUID, consumer_id: str) -> int: ...

    async def write(self, rows: Sequence[ResultRow], finished: Sequence[uuid.UUID] = ()) -> WriteReport: ...

    async def record_dead_lettered(self, task_ids: Sequence[uuid.UUID]) -> None: ...


PublisherSource = Callable[[], Awaitable[Publisher | None]]


@dataclass(frozen=True)
class Settled:
    """What the caller must know of a settled batch: whether the sink or the results exchange was away
    (then it pauses until it is back)."""

    sink_down: bool = False
    events_down: bool = False


class Settler:
    def __init__(
        self, settings: ConsumerSettings, model: ModelInfo, sink: ResultStore, metrics: ConsumerMetrics
    ) -> None:
        self._settings = settings
        self._model = model
        self._sink = sink
        self._metrics = metrics
        self._topology = Topology.from_settings(settings)
        self._in_commit_order = asyncio.Lock()

    async def guard(self, job: Job) -> None:
        """Before a redelivered job is decoded: mark it in progress, and fail it unrun when earlier starts
        of it never finished ``max_crashes`` times (the consumer died with it in hand)."""
        if not job.redelivered or not job.needs_inference:
            return
        try:
            unfinished = await self._sink.mark_started(job.task_id, self._settings.consumer_id)
        except SinkUnavailableError as error:
            job.outcome = SinkUnavailable(str(error))
            return
        job.marked = True
        if unfinished >= self._settings.max_crashes:
            job.outcome = Crashed(unfinished)

    async def settle(self, jobs: Sequence[Job], publishing: PublisherSource) -> Settled:
        """Decide and carry out every job's fate; ``publishing`` gives the connection for events and
        copies (None when the broker cannot be reached), asked only when something is to be published."""
        try:
            stored = await self._stored(jobs)
        except SinkUnavailableError as error:
            logger.warning("Sink unavailable: %s", error)
            await self.requeue(jobs)
            return Settled(sink_down=True)
        actions = [
            decide(
                j.outcome or SinkUnavailable("no outcome"),
                j.task,
                self._settings.max_retries,
                stored.get(j.task_id),
            )
            for j in jobs
        ]
        async with self._in_commit_order:  # one replica's events leave in the order its rows committed
            report = await self._write(jobs, actions)
            if report is None:
                await self.requeue(jobs)
                return Settled(sink_down=True)
            publisher = await publishing() if self._publishes(report, actions) else None
            announcing = self._announce(report.committed, publisher)  # on the wire in commit order
        announced = await announcing  # the confirms, waited for outside: the next batch may commit
        # A row whose event was not confirmed keeps its message: the redelivery announces it again.
        unannounced = [
            a.status is not None and not a.requeue and j.task_id not in announced
            for j, a in zip(jobs, actions, strict=True)
        ]
        confirmed = await asyncio.gather(
            *(
                self._publish(j, a, publisher) if not missing else _false()
                for j, a, missing in zip(jobs, actions, unannounced, strict=True)
            )
        )
        await self._record_dead_lettered(
            [j.task_id for j, a, ok in zip(jobs, actions, confirmed, strict=True) if ok and a.dead_letter]
        )
        for job, action, ok in zip(jobs, actions, confirmed, strict=True):
            self._metrics.outcomes.labels(action.kind).inc()
            if action.status is not None:
                lane = job.task.lane if job.task else None
                self._metrics.frame_settled(lane, job.camera_id, action.status)
            if action.requeue or not ok:
                await job.acker.requeue(job.delivery)
            else:
                await job.acker.ack(job.delivery, flush=False)
        await _flush(job.acker for job in jobs)  # one ack frame per channel for the whole batch
        return Settled(sink_down=any(a.requeue for a in actions), events_down=any(unannounced))

    def _publishes(self, report: WriteReport, actions: Sequence[Action]) -> bool:
        copies = any(a.dead_letter or a.retry for a in actions if not a.requeue)
        return copies or (self._settings.result_events and bool(report.committed))

    def _announce(
        self, committed: Mapping[uuid.UUID, Mapping[str, Any]], publisher: Publisher | None
    ) -> Awaitable[set[uuid.UUID]]:
        """Start publishing one result event per committed row, in row order, and return what awaits their
        confirms: the task ids announced (all of them when events are off). The publishes are tasks started
        here, so they reach the channel before those of any batch that commits after this one."""
        if not self._settings.result_events:
            return _ready(set(committed))
        if publisher is None:
            if committed:
                logger.warning("No connection for %d result events; requeueing them", len(committed))
            return _ready(set())
        events = [ResultEvent.from_row(row) for row in committed.values()]
        sends = [asyncio.ensure_future(self._publish_event(e, publisher)) for e in events]
        return _announced(events, sends)

    async def _publish_event(self, event: ResultEvent, publisher: Publisher) -> bool:
        try:
            await publisher.publish(event.to_envelope(), EXCHANGE_RESULTS, mandatory=False)
        except BrokerError as error:
            with task_context(str(event.task_id), event.trace_id):
                logger.warning("Could not publish the result event, requeueing: %s", error)
            self._metrics.result_events.labels("refused").inc()
            return False
        self._metrics.result_events.labels("confirmed").inc()
        return True

    async def requeue(self, jobs: Iterable[Job], why: str | None = None) -> int:
        """Hand messages back to the broker unsettled (no attempt burned); returns how many."""
        count = 0
        for job in jobs:
            if why:
                with task_context(str(job.task_id), job.task.trace_id if job.task else None):
                    logger.warning("Requeueing: %s", why)
            await job.acker.requeue(job.delivery)
            count += 1
        return count

    async def requeue_all(self, ledgers: Iterable[Acker]) -> int:
        """Requeue whatever the channels still hold (the end of a drain)."""
        count = 0
        for ledger in ledgers:
            count += await ledger.requeue_all()
        return count

    async def _stored(self, jobs: Sequence[Job]) -> dict[uuid.UUID, Stored]:
        """What the sink holds, read only when it can change a decision (an ok outcome never looks)."""
        if all(isinstance(j.outcome, Ok) for j in jobs):
            return {}
        return await self._sink.stored([j.task_id for j in jobs])

    async def _write(self, jobs: Sequence[Job], actions: Sequence[Action]) -> WriteReport | None:
        """Commit the rows and clear the in-progress marks; None when the sink did not take them."""
        now = datetime.now(UTC)
        rows = [
            build_row(j, a, self._model, self._settings.consumer_id, now)
            for j, a in zip(jobs, actions, strict=True)
        ]
        waited = (time.monotonic() - max(j.received_mono for j in jobs)) * 1000
        written = [replace(r, sink_ms=waited) for r in rows if r is not None]
        finished = [j.task_id for j, a in zip(jobs, actions, strict=True) if j.marked and not a.requeue]
        if not written and not finished:
            return WriteReport(0, 0, 0, 0.0)
        try:
            report = await self._sink.write(written, finished)
        except SinkUnavailableError as error:
            logger.warning("Sink unavailable: %s", error)
            return None
        self._observe(report, written)
        return report

    def _observe(self, report: WriteReport, rows: Sequence[ResultRow]) -> None:
        self._metrics.sink.observe(report.seconds)
        self._metrics.redeliveries.inc(report.absorbed)
        for row in rows:
            if row.end_to_end_ms is not None:
                self._metrics.end_to_end.observe(row.end_to_end_ms / 1000)
            if row.queue_wait_ms is not None:
                self._metrics.queue_wait.observe(row.queue_wait_ms / 1000)

    async def _publish(self, job: Job, action: Action, publisher: Publisher | None) -> bool:
        """Publish the copy an action needs and wait for its confirm; False when it was not confirmed."""
        if action.requeue or not (action.dead_letter or action.retry):
            return True
        with task_context(str(job.task_id), job.task.trace_id if job.task else None):
            if publisher is None:
                logger.warning("No connection for the %s copy; requeueing", action.kind)
                return False
            envelope, exchange = self._copy(job, action)
            try:
                await publisher.publish(envelope, exchange)
            except BrokerError as error:
                logger.warning("Could not publish the %s copy, requeueing: %s", action.kind, error)
                return False
            if action.retry is not None:
                logger.info("Retrying (attempt %d) via %s: %s", action.retry.attempt, exchange, action.reason)
            else:
                logger.warning("Dead-lettered: %s", action.reason)
        return True

    def _copy(self, job: Job, action: Action) -> tuple[Envelope, str]:
        envelope = job.delivery.envelope
        if action.retry is not None:
            level = self._topology.retry_level_for(action.retry.attempt)
            return envelope.republished(**{H_ATTEMPT: action.retry.attempt}), level
        attempt = job.task.attempt if job.task else 1
        copy = dead_letter_copy(envelope, action.reason or "failed", attempt, datetime.now(UTC))
        return replace(copy, message_id=str(job.task_id)), EXCHANGE_DLQ

    async def _record_dead_lettered(self, task_ids: list[uuid.UUID]) -> None:
        """A failure here only risks a second copy if the message is redelivered; the acks still go out."""
        if not task_ids:
            return
        try:
            await self._sink.record_dead_lettered(task_ids)
        except SinkUnavailableError as error:
            for task_id in task_ids:
                with task_context(str(task_id), None):
                    logger.warning("Could not record the DLQ copy as confirmed: %s", error)


async def _false() -> bool:
    return False


async def _ready(task_ids: set[uuid.UUID]) -> set[uuid.UUID]:
    return task_ids


async def _announced(events: Sequence[ResultEvent], sends: Sequence[Awaitable[bool]]) -> set[uuid.UUID]:
    sent = await asyncio.gather(*sends)
    return {e.task_id for e, ok in zip(events, sent, strict=True) if ok}


async def _flush(ledgers: Iterable[Acker]) -> None:
    for ledger in {id(a): a for a in ledgers}.values():
        await ledger.flush()
