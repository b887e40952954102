"""The worker: receive → admit → batch → decode → infer → write → settle, over one connection at a time.

Decode runs in a thread pool (cv2 releases the GIL) and inference in its own thread, so decoding batch N+1
overlaps inferring batch N (``batches_in_flight`` batches at once). Every message is settled on its own
merit through :func:`consumer.outcomes.decide`; acks go out per channel through :class:`Acker`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from consumer.acker import Acker
from consumer.decode import decode_frame
from consumer.detector.base import DecodedFrame, Detection, Detector, InferenceError
from consumer.health import HealthState, start_health_server
from consumer.jobs import Job, admit, build_row, check_deadline, task_id_of
from consumer.metrics import ConsumerMetrics
from consumer.outcomes import Action, BadInput, Ok, Outcome, SinkUnavailable, Transient, decide
from consumer.sink import ResultRow, Sink, SinkUnavailableError, StoredRow, WriteReport
from shared.broker.aio import Broker, ConnectionLoss, Delivery, DeliveryHandler, Subscription
from shared.broker.quarantine import quarantine_undecodable
from shared.errors import BrokerError
from shared.logs import task_context
from shared.schema import dead_letter_copy
from shared.settings import ConsumerSettings
from shared.topology import (
    EXCHANGE_DLQ,
    EXCHANGE_RETRY_READY,
    QUEUE_BULK,
    QUEUE_INTAKE,
    QUEUE_REALTIME,
    QUEUE_RETRY_READY,
    Topology,
)

logger = logging.getLogger(__name__)

MAX_SWEEP_BACKOFF_S = 60.0
RECONNECT_DELAY_S = 1.0
CLOSE_REASON_WAIT_S = 5.0
SINK_POLL_S = 1.0
HOUSEKEEPING_S = 0.5


class Worker:
    """One consumer replica. ``run()`` returns the process exit code."""

    def __init__(
        self, settings: ConsumerSettings, detector: Detector, metrics: ConsumerMetrics | None = None
    ):
        self.settings = settings
        self.detector = detector
        self.metrics = metrics or ConsumerMetrics()
        self.topology = Topology.from_settings(settings)
        self.health = HealthState(stall_s=settings.stall_s, held=self.held)
        self._realtime: deque[Job] = deque()
        self._others: deque[Job] = deque()
        self._work = asyncio.Event()
        self._stop = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.batches_in_flight)
        self._batches: set[asyncio.Task[None]] = set()
        self._batcher: asyncio.Task[None] | None = None
        # One Acker per consumer channel of the current connection: delivery tags count per channel, and a
        # resume after a sink outage opens new channels while batches from the old ones may still settle.
        # Old ones stay until the connection goes, so a late delivery on a cancelled consumer is requeued.
        self._ackers: list[Acker] = []
        self._subscriptions: list[tuple[Acker, Subscription]] = []
        self._retiring: list[tuple[Acker, Subscription]] = []  # cancelled; closed once their acker is empty
        self._broker: Broker | None = None
        self._sink: Sink | None = None
        self._paused = False
        self._decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self._infer_pool = ThreadPoolExecutor(1, thread_name_prefix="infer")
        self._idle_since: float | None = None
        self.exit_reason = ""

    # ---- public ---------------------------------------------------------------------------------------

    def open_channels(self) -> int:
        """Channels open on the current connection (0 between connections)."""
        return 0 if self._broker is None or self._broker.is_closed else self._broker.open_channels()

    def held(self) -> int:
        return sum(len(a) for a in self._ackers)

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
            await self._serve()
        finally:
            await self._close()
            if runner is not None:
                await runner.cleanup()
        return 0

    # ---- start-up and connection generations ----------------------------------------------------------

    async def _prepare(self) -> None:
        info = self.detector.info
        self.metrics.model.info({"name": info.name, "sha256": info.sha256, "provider": info.provider})
        await asyncio.get_running_loop().run_in_executor(self._infer_pool, self.detector.warm_up)
        self.health.model_ready = True
        logger.info("Model %s (%s) ready on %s", info.name, info.sha256[:12], info.provider)
        while not self._stop.is_set() and self._sink is None:
            try:
                self._sink = await Sink.open(self.settings.database_url)
            except SinkUnavailableError as error:
                logger.warning("Postgres unavailable, waiting: %s", error)
                await self._sleep(SINK_POLL_S)
        self.health.database_ok = self._sink is not None

    async def _serve(self) -> None:
        housekeeping = asyncio.create_task(self._housekeeping())
        batcher = self._batcher = asyncio.create_task(self._batch_loop())
        try:
            failed_sweeps = 0
            while not self._stop.is_set():
                loss = await self._one_connection()
                if loss is not None and loss.undecodable_frame and not self._stop.is_set():
                    failed_sweeps = 0 if await self._quarantine() else failed_sweeps + 1
                    if failed_sweeps:  # neither client can read it: each new connection would die at once
                        await self._sleep(min(RECONNECT_DELAY_S * 2**failed_sweeps, MAX_SWEEP_BACKOFF_S))
        finally:
            batcher.cancel()
            housekeeping.cancel()
            await asyncio.gather(batcher, housekeeping, return_exceptions=True)

    async def _one_connection(self) -> ConnectionLoss | None:
        """Consume over one connection until it is lost (returns why) or the worker stops (None)."""
        try:
            broker = await Broker.connect(
                self.settings.amqp_url, f"detfleet-consumer:{self.settings.consumer_id}", robust=False
            )
        except BrokerError as error:
            logger.warning("Broker unavailable, retrying: %s", error)
            await self._sleep(RECONNECT_DELAY_S)
            return None
        lost: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def on_loss(loss: ConnectionLoss) -> None:
            if not lost.done():
                lost.set_result(loss)

        broker.on_close(on_loss)
        self._broker = broker
        try:
            if not self._paused:
                try:
                    await self._start_consuming()
                except BrokerError as error:
                    return await self._loss_while_starting(lost, error)
            self.health.channel_open = True
            stop: asyncio.Future[Any] = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait([lost, stop], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if self._stop.is_set() and not lost.done():
                await self._drain()
                return None
            loss = lost.result()
            assert isinstance(loss, ConnectionLoss)
            logger.warning("Connection lost (%s); the broker requeues what was held", loss.reason)
            return loss
        finally:
            self.health.channel_open = False
            self._forget_connection()
            await broker.close()

    async def _loss_while_starting(self, lost: asyncio.Future[Any], error: BrokerError) -> ConnectionLoss:
        """Consuming failed part-way: usually the connection is dying (a lane delivered a message the client
        cannot decode while the next lane's channel was opening). Its close reason decides what comes next."""
        logger.warning("Could not start consuming: %s", error)
        with contextlib.suppress(TimeoutError):
            loss = await asyncio.wait_for(asyncio.shield(lost), CLOSE_REASON_WAIT_S)
            assert isinstance(loss, ConnectionLoss)
            return loss
        await self._sleep(RECONNECT_DELAY_S)  # the connection still stands: start over on a fresh one
        return ConnectionLoss(str(error), undecodable_frame=False)

    def _forget_connection(self) -> None:
        """Deliveries of a dead channel are the broker's again: drop them without settling."""
        self._realtime.clear()
        self._others.clear()
        self._ackers.clear()
        self._subscriptions.clear()
        self._retiring.clear()
        self.metrics.in_flight.set(0)

    async def _start_consuming(self) -> None:
        assert self._broker is not None
        s = self.settings
        lanes = (
            (QUEUE_REALTIME, s.lane_realtime_prefetch),
            (QUEUE_BULK, s.bulk_prefetch),
            (QUEUE_RETRY_READY, s.bulk_prefetch),
            (QUEUE_INTAKE, s.max_batch),
        )
        for queue, prefetch in lanes:
            acker = Acker()
            self._ackers.append(acker)
            self._subscriptions.append(
                (acker, await self._broker.consume(queue, self._receiver(acker), prefetch))
            )
        self.metrics.ready.set(1)

    async def _stop_consuming(self) -> None:
        stopped, self._subscriptions = self._subscriptions, []
        for _, subscription in stopped:
            await subscription.cancel()
        self._retiring.extend(stopped)
        self.metrics.ready.set(0)

    async def _close_settled_channels(self) -> None:
        """A paused consumer's channels stay open until what they delivered is settled (an ack must travel
        on the channel that delivered); then they close, so pauses cannot pile channels up to the limit."""
        settled = [(acker, sub) for acker, sub in self._retiring if len(acker) == 0]
        for acker, subscription in settled:
            self._retiring.remove((acker, subscription))
            self._ackers.remove(acker)
        for _, subscription in settled:
            await subscription.close()

    async def _quarantine(self) -> bool:
        queues = [QUEUE_REALTIME, QUEUE_BULK, QUEUE_RETRY_READY, QUEUE_INTAKE]
        try:
            report = await asyncio.to_thread(
                quarantine_undecodable,
                self.settings.amqp_url,
                queues,
                EXCHANGE_RETRY_READY,
                self.settings.bulk_prefetch * 4,
            )
        except BrokerError as error:
            logger.error("Quarantine sweep failed; reconnecting with backoff: %s", error)
            return False
        logger.warning(
            "Quarantine sweep: %d scanned, %d moved aside", report.scanned, len(report.quarantined)
        )
        return True

    # ---- receiving and batching ----------------------------------------------------------------------

    def _receiver(self, acker: Acker) -> DeliveryHandler:
        async def receive(delivery: Delivery) -> None:
            await self._on_delivery(delivery, acker)

        return receive

    async def _on_delivery(self, delivery: Delivery, acker: Acker) -> None:
        if acker not in self._ackers:  # a late delivery on a connection we already forgot
            return
        acker.track(delivery)
        self.metrics.received.labels(delivery.queue).inc()
        self.metrics.in_flight.set(self.held())
        job = Job(delivery, acker)
        if self._paused or self._stop.is_set():
            await acker.requeue(delivery)
            return
        admit(job)
        (self._realtime if delivery.queue == QUEUE_REALTIME else self._others).append(job)
        self._work.set()

    def _next_job(self) -> Job | None:
        if self._realtime:
            return self._realtime.popleft()
        if self._others:
            return self._others.popleft()
        self._work.clear()
        return None

    async def _batch_loop(self) -> None:
        while True:
            await self._slots.acquire()
            batch = await self._collect_batch()
            task = asyncio.create_task(self._run_batch(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _collect_batch(self) -> list[Job]:
        """Up to ``max_batch`` jobs, realtime first, waiting at most ``max_wait_ms`` after the first."""
        first = self._next_job()
        while first is None:
            await self._work.wait()
            first = self._next_job()
        batch = [first]
        deadline = time.monotonic() + self.settings.max_wait_ms / 1000
        while len(batch) < self.settings.max_batch:
            job = self._next_job()
            if job is not None:
                batch.append(job)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._work.wait(), remaining)
        return batch

    # ---- one batch ----------------------------------------------------------------------------------

    async def _run_batch(self, batch: list[Job]) -> None:
        try:
            started = datetime.now(UTC)
            for job in batch:
                job.batch_started = started
                check_deadline(job, started)
            work = [j for j in batch if j.needs_inference]
            if work:
                await self._decode(work)
                await self._infer([j for j in work if j.needs_inference])
            await self._settle_batch(batch)
            self.health.progressed()
        except Exception:
            logger.exception("Batch of %d failed unexpectedly; requeueing it", len(batch))
            for job in batch:
                await job.acker.requeue(job.delivery)
        finally:
            self._slots.release()
            self.metrics.in_flight.set(self.held())

    async def _decode(self, jobs: Sequence[Job]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        input_size = self.detector.info.input_size
        frames = await asyncio.gather(
            *(
                loop.run_in_executor(self._decode_pool, decode_frame, j.delivery.envelope.body, input_size)
                for j in jobs
            )
        )
        elapsed = time.perf_counter() - started
        self.metrics.decode.observe(elapsed)
        for job, frame in zip(jobs, frames, strict=True):
            job.decode_ms = elapsed * 1000
            if isinstance(frame, str):
                job.outcome = BadInput(frame)
            else:
                job.image = frame

    async def _infer(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        self.metrics.batch_size.observe(len(jobs))
        seconds = await self._infer_isolating(jobs)
        self.metrics.inference.observe(seconds)
        for job in jobs:
            job.inference_ms = seconds * 1000
            job.image = None  # the pixels are not needed any more: free them before the sink

    async def _infer_isolating(self, jobs: list[Job]) -> float:
        """Infer a batch; when it fails with no culprit named, bisect it to find the poison message.
        Returns the seconds spent inferring (not waiting for the inference thread)."""
        images = [j.image for j in jobs if j.image is not None]
        started = time.perf_counter()
        try:
            results, seconds = await asyncio.get_running_loop().run_in_executor(
                self._infer_pool, _timed, self.detector, images
            )
        except InferenceError as error:
            spent = time.perf_counter() - started
            if len(jobs) == 1:
                jobs[0].outcome = Transient(f"inference failed: {error}")
                return spent
            middle = len(jobs) // 2
            return (
                spent
                + await self._infer_isolating(jobs[:middle])
                + await self._infer_isolating(jobs[middle:])
            )
        for job, detections, frame in zip(jobs, results, images, strict=True):
            job.outcome = Ok(tuple(detections), *frame.source_size)
        return seconds

    # ---- settling -----------------------------------------------------------------------------------

    async def _settle_batch(self, batch: list[Job]) -> None:
        now = datetime.now(UTC)
        actions = [decide(self._outcome(j), j.task, self.settings.max_retries) for j in batch]
        rows = [
            build_row(j, a, self.detector.info, self.settings.consumer_id, now)
            for j, a in zip(batch, actions, strict=True)
        ]
        written = [r for r in rows if r is not None]
        if written:
            report = await self._write(written, batch)
            if report is None:
                actions = [decide(SinkUnavailable("Postgres unavailable"), j.task, 0) for j in batch]
            else:
                actions = [
                    _keep_failed_promise(j, a, report.kept) for j, a in zip(batch, actions, strict=True)
                ]
        for job, action in zip(batch, actions, strict=True):
            await self._settle(job, action)
        for acker in {id(j.acker): j.acker for j in batch}.values():
            await acker.flush()  # one ack frame per channel for the whole batch

    @staticmethod
    def _outcome(job: Job) -> Outcome:
        assert job.outcome is not None, "every job has an outcome by settle time"
        return job.outcome

    async def _write(self, rows: list[ResultRow], batch: list[Job]) -> WriteReport | None:
        """Write the batch's rows; None when Postgres did not take them (the worker pauses)."""
        assert self._sink is not None
        waited = (time.monotonic() - max(j.received_mono for j in batch)) * 1000
        try:
            report = await self._sink.write([replace(r, sink_ms=waited) for r in rows])
        except SinkUnavailableError as error:
            logger.warning("Sink unavailable: %s", error)
            await self._pause_for_sink()
            return None
        self.metrics.sink.observe(report.seconds)
        self.metrics.redeliveries.inc(report.absorbed)
        for row in rows:
            if row.end_to_end_ms is not None:
                self.metrics.end_to_end.observe(row.end_to_end_ms / 1000)
            if row.queue_wait_ms is not None:
                self.metrics.queue_wait.observe(row.queue_wait_ms / 1000)
        return report

    async def _settle(self, job: Job, action: Action) -> None:
        """Carry out one decided action: publish what it needs (confirmed), then ack (the batch flushes the
        ack frames), or requeue."""
        self.metrics.outcomes.labels(action.kind).inc()
        task = job.task
        with task_context(
            str(task.task_id) if task else job.delivery.envelope.message_id, task.trace_id if task else None
        ):
            if action.requeue:
                await job.acker.requeue(job.delivery)
                return
            try:
                await self._publish_for(job, action)
            except BrokerError as error:
                logger.warning("Could not publish %s copy, requeueing: %s", action.kind, error)
                await job.acker.requeue(job.delivery)
                return
            if action.dead_letter:
                logger.warning("Dead-lettered: %s", action.reason)
            await job.acker.ack(job.delivery, flush=False)

    async def _publish_for(self, job: Job, action: Action) -> None:
        broker = self._broker
        if broker is None or not (action.dead_letter or action.retry):
            return
        envelope = job.delivery.envelope
        if action.retry is not None:
            level = self.topology.retry_level_for(action.retry.attempt)
            await broker.publish(envelope.republished(**{"x-detfleet-attempt": action.retry.attempt}), level)
            logger.info("Retrying (attempt %d) via %s: %s", action.retry.attempt, level, action.reason)
        elif action.dead_letter:
            attempt = job.task.attempt if job.task else 1
            copy = dead_letter_copy(envelope, action.reason or "failed", attempt, datetime.now(UTC))
            await broker.publish(copy, EXCHANGE_DLQ)

    # ---- sink outage, hold limit, idle exit, drain ------------------------------------------------------

    async def _pause_for_sink(self) -> None:
        """Stop taking work until Postgres answers again; what waits is requeued (no attempt burned)."""
        if self._paused:
            return
        self._paused = True
        self.health.database_ok = False
        await self._stop_consuming()
        await self._requeue_waiting()
        asyncio.create_task(self._resume_when_sink_answers())  # noqa: RUF006 (kept alive by its loop)

    async def _resume_when_sink_answers(self) -> None:
        assert self._sink is not None
        while not self._stop.is_set() and not await self._sink.ping():
            await self._sleep(SINK_POLL_S)
        logger.info("Postgres answers again; resuming")
        self.health.database_ok = True
        self._paused = False
        if self._broker is not None and not self._broker.is_closed and not self._stop.is_set():
            try:
                await self._start_consuming()
            except BrokerError as error:  # the connection is going: its next generation consumes instead
                logger.warning("Could not resume consuming: %s", error)

    async def _requeue_waiting(self) -> int:
        waiting = list(self._realtime) + list(self._others)
        self._realtime.clear()
        self._others.clear()
        for job in waiting:
            await job.acker.requeue(job.delivery)
        return len(waiting)

    async def _housekeeping(self) -> None:
        while not self._stop.is_set():
            await self._sleep(HOUSEKEEPING_S)
            await self._close_settled_channels()
            await self._requeue_overheld()
            await self._check_idle()

    async def _requeue_overheld(self) -> None:
        """Hand back messages that waited too long behind other work (well under consumer_timeout)."""
        now = time.monotonic()
        for lane in (self._realtime, self._others):
            stale = [j for j in lane if j.held_for(now) > self.settings.max_hold_s]
            for job in stale:
                lane.remove(job)
                logger.warning("Held %.0f s without starting; requeueing", job.held_for(now))
                await job.acker.requeue(job.delivery)

    async def _check_idle(self) -> None:
        limit = self.settings.exit_when_idle_s
        if limit is None or self._broker is None or self._broker.is_closed:
            return
        if self.held() or self._batches or not await self._queues_empty():
            self._idle_since = None
            return
        self._idle_since = self._idle_since or time.monotonic()
        if time.monotonic() - self._idle_since >= limit:
            self.request_stop(f"idle for {limit:g} s")

    async def _queues_empty(self) -> bool:
        assert self._broker is not None
        queues = [QUEUE_REALTIME, QUEUE_BULK, QUEUE_RETRY_READY, QUEUE_INTAKE, *self.topology.retry_levels]
        try:
            for queue in queues:
                if await self._broker.queue_depth(queue):
                    return False
        except BrokerError:
            return False
        return True

    async def _drain(self) -> None:
        """Graceful stop: take no more, finish the batches in flight within the grace, requeue the rest."""
        await self._stop_consuming()
        if self._batcher is not None:
            self._batcher.cancel()  # a batch still forming is requeued below with everything not started
        requeued = await self._requeue_waiting()
        if self._batches:
            _, late = await asyncio.wait(set(self._batches), timeout=self.settings.shutdown_grace_s)
            for task in late:
                task.cancel()
        for acker in list(self._ackers):
            requeued += await acker.requeue_all()
        logger.info("Drained: %d messages handed back to the broker", requeued)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _close(self) -> None:
        if self._sink is not None:
            await self._sink.close()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._infer_pool.shutdown(wait=False, cancel_futures=True)


def _keep_failed_promise(job: Job, action: Action, kept: dict[uuid.UUID, StoredRow]) -> Action:
    """A task whose row already says ``failed`` gets its DLQ entry, whatever this delivery decided.

    An earlier delivery wrote the failed row and died before its DLQ copy was confirmed (a crash, a cut
    link); the redelivery may now decide otherwise (a realtime frame past its deadline only sheds, and the
    failed row stays, since only ``ok`` replaces a row): without this, the row would have no DLQ entry.
    """
    task_id = task_id_of(job)
    stored = kept.get(task_id) if task_id is not None else None
    if stored is None or stored.status != "failed" or action.dead_letter or action.status is None:
        return action
    return replace(action, dead_letter=True, reason=stored.reason or action.reason or "failed")


def _timed(detector: Detector, images: list[DecodedFrame]) -> tuple[list[list[Detection]], float]:
    """Runs in the inference thread, so the time excludes waiting for the batch ahead."""
    started = time.perf_counter()
    results = detector.detect(images)
    return results, time.perf_counter() - started
