"""The worker: the conductor of one consumer replica.

A message travels receive → admit → batch → guard → decode → infer → settle (docs/message-flow.md). The
parts never call back into the worker except through the callbacks it hands them:

- :class:`~consumer.connection.Connection`: connection generations, consuming, pause and resume, the
  quarantine sweep;
- :class:`~consumer.batcher.Batcher`: lanes, batch forming, realtime first, redeliveries alone;
- :class:`~consumer.pipeline.Pipeline`: decode, infer, bisect, out-of-memory splits;
- :class:`~consumer.settle.Settler`: the crash-loop guard, the decision, rows, copies, acks and requeues.

The worker only orders them: it starts and stops them, pauses for a sink or results-exchange outage, hands
back what waited too long, exits when idle, and drains on a stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

from consumer.batcher import Batcher, BatchLimit
from consumer.connection import Connection
from consumer.detector.base import Detector
from consumer.health import HealthState, start_health_server
from consumer.jobs import Job, admit, check_deadline
from consumer.metrics import ConsumerMetrics
from consumer.pipeline import Pipeline
from consumer.settle import Settler
from consumer.sink import Sink, SinkUnavailableError
from consumer.slots import Claim, Slots
from shared.backoff import Stopped, until_it_works
from shared.errors import BrokerUnavailableError
from shared.settings import ConsumerSettings
from shared.topology import EXCHANGE_RESULTS

logger = logging.getLogger(__name__)

HOUSEKEEPING_S = 0.5
PAUSE_AT_LEAST_S = 1.0


class Worker:
    """One consumer replica. ``run()`` returns the process exit code."""

    def __init__(
        self, settings: ConsumerSettings, detector: Detector, metrics: ConsumerMetrics | None = None
    ):
        self.settings = settings
        self.detector = detector
        self.metrics = metrics or ConsumerMetrics(max_cameras=settings.metrics_max_cameras)
        self.health = HealthState(stall_s=settings.stall_s, held=self.held)
        limit = BatchLimit(settings.max_batch, settings.oom_cooldown_s)
        self.batcher = Batcher(limit, settings.max_wait_ms / 1000)
        self.pipeline = Pipeline(detector, settings.decode_threads, self.metrics)
        self.connection = Connection(
            settings, self._receive, self._connection_lost, self.health, self.metrics
        )
        self._sink: Sink | None = None
        self._settler: Settler | None = None
        self._stop = asyncio.Event()
        self._slots = Slots(settings.batches_in_flight)
        self._batches: set[asyncio.Task[None]] = set()
        self._chores: set[asyncio.Task[None]] = set()
        self._idle_since: float | None = None
        self.exit_reason = ""

    def open_channels(self) -> int:
        """Channels open on the current connection (0 between connections)."""
        return self.connection.open_channels()

    def held(self) -> int:
        return self.connection.held()

    def request_stop(self, reason: str = "stop requested") -> None:
        if not self._stop.is_set():
            logger.info("Stopping: %s", reason)
            self.exit_reason = reason
            self._stop.set()

    async def run(self) -> int:
        runner = None
        if self.settings.health_port:
            runner = await start_health_server(self.health, self.metrics, self.settings.health_port)
        try:
            await self._prepare()
            if self._settler is not None:
                await self._serve(self._settler)
        finally:
            await self._close()
            if runner is not None:
                await runner.cleanup()
        return 0

    async def _prepare(self) -> None:
        info = self.detector.info
        self.metrics.model.info({"name": info.name, "sha256": info.sha256, "provider": info.provider})
        self.metrics.batch_limit.set(self.batcher.limit.current)
        await self.pipeline.warm_up()
        self.health.model_ready = True
        logger.info("Model %s (%s) ready on %s", info.name, info.sha256[:12], info.provider)
        url = self.settings.database_url
        try:
            self._sink = await until_it_works(
                lambda: Sink.open(url), "connecting to Postgres", self._stop, 1.0
            )
        except Stopped:
            return
        self.health.database_ok = True
        self._settler = Settler(self.settings, info, self._sink, self.metrics)

    async def _serve(self, settler: Settler) -> None:
        helpers = [
            asyncio.create_task(self._form_batches(settler)),
            asyncio.create_task(self._housekeeping(settler)),
        ]
        try:
            await self.connection.serve(self._stop, lambda: self._drain(settler, helpers[0]))
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    # ---- receiving and batching ----------------------------------------------------------------------

    async def _receive(self, job: Job) -> None:
        assert self._settler is not None, "the connection serves only once the worker is prepared"
        if self.connection.paused or self._stop.is_set():
            await self._settler.requeue([job])
            return
        admit(job)
        self.metrics.frame_received(job.camera_id)
        self.batcher.add(job)

    def _connection_lost(self) -> None:
        """Deliveries of a dead connection are the broker's again: forget those still waiting."""
        self.batcher.take_all()

    async def _form_batches(self, settler: Settler) -> None:
        while True:
            claim = await self._slots.take(self.batcher.realtime_waiting)
            batch = await self.batcher.next_batch(claim.realtime_only)
            if not batch:  # the realtime frames went (a pause, the hold limit) before the batch formed
                self._slots.release(claim)
                continue
            if batch[
                0
            ].redelivered:  # alone in flight too: if it kills the process, no neighbour dies with it
                await self._slots.take_all(claim)
            task = asyncio.create_task(self._process(batch, settler, claim))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _process(self, batch: Sequence[Job], settler: Settler, claim: Claim) -> None:
        try:
            started = datetime.now(UTC)
            for job in batch:
                job.batch_started = started
                check_deadline(job, started)
                await settler.guard(job)  # a redelivery comes alone: at most one mark a batch
            inferred = await self.pipeline.run(batch)
            limit = self.batcher.limit
            if inferred.out_of_memory_at is not None:
                limit.shrink(inferred.out_of_memory_at)
                logger.warning(
                    "Out of memory at batch size %d; forming at most %d",
                    inferred.out_of_memory_at,
                    limit.current,
                )
            else:
                limit.succeeded(len(batch))
            self.metrics.batch_limit.set(limit.current)
            settled = await settler.settle(batch, self.connection.publisher)
            if settled.sink_down:
                await self._pause_for_sink(settler)
            elif settled.events_down:
                await self._pause_for_events(settler)
            self.health.progressed()
        except Exception:
            logger.exception("Batch of %d failed unexpectedly; requeueing it", len(batch))
            await settler.requeue(batch)
        finally:
            self._slots.release(claim)
            self.metrics.in_flight.set(self.held())

    # ---- sink and results outages, hold limit, idle exit, drain -------------------------------------------

    async def _pause_for_sink(self, settler: Settler) -> None:
        """Stop taking work until Postgres answers again; what waits is requeued (no attempt burned)."""
        if await self._pause(settler):
            self.health.database_ok = False
            self._start_chore(self._resume_when(self._ping_sink, "Postgres"))

    async def _pause_for_events(self, settler: Settler) -> None:
        """Stop taking work until the results exchange takes events again: nothing may be acked before its
        row's event is confirmed, so working on would only requeue."""
        if await self._pause(settler):
            self._start_chore(self._resume_when(self._ping_results, f"the {EXCHANGE_RESULTS} exchange"))

    async def _pause(self, settler: Settler) -> bool:
        """Pause and requeue what waits; False when already paused (another outage's chore resumes)."""
        if self.connection.paused:
            return False
        await self.connection.pause()
        await settler.requeue(self.batcher.take_all())
        return True

    def _start_chore(self, work: Coroutine[Any, Any, None]) -> None:
        chore = asyncio.create_task(work)
        self._chores.add(chore)
        chore.add_done_callback(self._chores.discard)

    async def _resume_when(self, probe: Callable[[], Awaitable[None]], what: str) -> None:
        # A first wait even when the probe would pass at once: a service that answers probes but refuses the
        # work (a permission taken away) must not turn into a requeue loop.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), PAUSE_AT_LEAST_S)
        try:
            await until_it_works(probe, f"waiting for {what}", self._stop, 1.0, 5.0)
        except Stopped:
            return
        logger.info("Resuming: %s answers again", what)
        await self.connection.resume()

    async def _ping_sink(self) -> None:
        assert self._sink is not None
        if not await self._sink.ping():
            raise SinkUnavailableError("Postgres does not answer")
        self.health.database_ok = True

    async def _ping_results(self) -> None:
        publisher = await self.connection.publisher()
        if publisher is None or not await publisher.exchange_exists(EXCHANGE_RESULTS):
            raise BrokerUnavailableError(f"the {EXCHANGE_RESULTS} exchange does not take events")

    async def _housekeeping(self, settler: Settler) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(HOUSEKEEPING_S)
            await self.connection.close_settled_channels()
            stale = self.batcher.take_overheld(self.settings.max_hold_s)
            await settler.requeue(stale, f"held over {self.settings.max_hold_s:g} s without starting")
            await self._check_idle()

    async def _check_idle(self) -> None:
        limit = self.settings.exit_when_idle_s
        if limit is None or self.connection.broker is None:
            return
        if self.held() or self._batches or not await self.connection.queues_empty():
            self._idle_since = None
            return
        self._idle_since = self._idle_since or time.monotonic()
        if time.monotonic() - self._idle_since >= limit:
            self.request_stop(f"idle for {limit:g} s")

    async def _drain(self, settler: Settler, forming: asyncio.Task[None]) -> None:
        """Graceful stop: take no more, finish the batches in flight within the grace, requeue the rest."""
        await self.connection.pause()
        forming.cancel()  # a batch still forming is requeued below with everything not started
        requeued = await settler.requeue(self.batcher.take_all())
        if self._batches:
            _, late = await asyncio.wait(set(self._batches), timeout=self.settings.shutdown_grace_s)
            for task in late:
                task.cancel()
        requeued += await settler.requeue_all(self.connection.ledgers())
        logger.info("Drained: %d messages handed back to the broker", requeued)

    async def _close(self) -> None:
        await self.connection.close()
        if self._sink is not None:
            await self._sink.close()
        self.pipeline.close()
