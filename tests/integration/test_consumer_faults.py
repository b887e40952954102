"""The consumer's failure paths against the real RabbitMQ and Postgres: kill -9, SIGTERM (once and twice),
a Postgres outage, a message the client library cannot decode, and the hold-time limit.

The process-level tests run the real ``detfleet consume`` CLI with a tiny ONNX model; the others run the
worker in-process so the test can watch its probes and hold its detector.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import numpy as np
import pika

from consumer.detector.base import DecodedFrame, Detection
from consumer.detector.fake import FakeDetector
from consumer.worker import Worker
from shared.broker.aio import Broker, Delivery
from shared.schema import H_REASON, Task
from shared.settings import AdminSettings
from shared.topology import EXCHANGE_FRAMES, QUEUE_BULK, QUEUE_DLQ, QUEUE_RETRY_READY
from tests.integration.consumer_support import (
    RUN_TIMEOUT_S,
    consumer_process,
    consumer_settings,
    drain_queue,
    jpeg,
    make_task,
    publish,
    row_count,
    rows_by_id,
    run_until_idle,
    running,
    white_jpeg,
)
from tests.integration.test_consumer_health import free_port, wait_for_status
from tests.support.onnx_graphs import CanvasBox, write_yolo_head_model
from tests.support.proxy import TcpProxy

POLL_S = 0.05
WAIT_S = 30.0  # a bound against hangs, never a timing assertion
STREAM = 200  # frames published for the process-level tests
POSTGRES_PORT = 5432


# ---- helpers --------------------------------------------------------------------------------------------


async def eventually(check: Callable[[], Awaitable[bool]], what: str, limit_s: float = WAIT_S) -> None:
    """Poll an external condition until it holds; fail naming it after ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while not await check():
        assert time.monotonic() < deadline, f"gave up waiting until {what}"
        await asyncio.sleep(POLL_S)


async def publish_stream(broker: Broker, count: int) -> list[Task]:
    tasks = [make_task(camera=f"cam-{i % 4}") for i in range(count)]
    body = jpeg(7)
    for task in tasks:
        await publish(broker, task, body)
    return tasks


async def assert_every_task_has_one_ok_row(database_url: str, tasks: Sequence[Task]) -> None:
    rows = await rows_by_id(database_url)
    assert await row_count(database_url) == len(tasks)  # task_id is the key: one row each, no strays
    assert set(rows) == {t.task_id for t in tasks}
    assert {r["status"] for r in rows.values()} == {"ok"}


async def assert_queues_empty(broker: Broker, *queues: str) -> None:
    for queue in queues:
        assert await broker.queue_depth(queue) == 0, queue


def tiny_model(folder: Path) -> Path:
    """A real ONNX model small enough that inference takes no noticeable time on two cores."""
    return write_yolo_head_model(
        folder / "tiny.onnx", [CanvasBox(8, 8, 40, 40, 0.9, 0)], input_size=(64, 64), anchors=8
    )


def consumer_env(amqp_url: str, database_url: str, **settings: str) -> dict[str, str]:
    """The inherited environment without any DETFLEET_ variable, plus this consumer's settings."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("DETFLEET_")}
    env |= {
        "DETFLEET_AMQP_URL": amqp_url,
        "DETFLEET_DATABASE_URL": database_url,
        "DETFLEET_HEALTH_PORT": "0",
        "DETFLEET_LOG_JSON": "false",
    }
    return env | {f"DETFLEET_{name.upper()}": value for name, value in settings.items()}


async def exit_code(process: asyncio.subprocess.Process, log: Path) -> int:
    try:
        return await asyncio.wait_for(process.wait(), RUN_TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(f"consumer did not exit; its log:\n{await read_log(log)}") from None


async def finish_with_fresh_consumer(model: Path, env: dict[str, str], log: Path) -> None:
    """A new replica that works until every queue is empty, then exits 0 by itself."""
    async with consumer_process(model, env, log, "--exit-when-idle", "0.5") as process:
        assert await exit_code(process, log) == 0, await read_log(log)


async def read_log(log: Path) -> str:
    return await asyncio.to_thread(log.read_text)


def via(proxy: TcpProxy, url: str) -> str:
    """``url`` pointed at the proxy (the helper is named for AMQP but rewrites any URL's host and port)."""
    return proxy.amqp_url(url)


# ---- 1. kill -9 ------------------------------------------------------------------------------------------


async def test_kill_9_mid_stream_then_a_new_consumer_leaves_exactly_one_row_per_task(
    broker: Broker, topology_settings: AdminSettings, results_db: str, tmp_path: Path
) -> None:
    model, log = tiny_model(tmp_path), tmp_path / "consumer.log"
    tasks = await publish_stream(broker, STREAM)
    env = consumer_env(topology_settings.amqp_url, results_db)

    async with consumer_process(model, env | {"DETFLEET_CONSUMER_ID": "killed"}, log) as victim:
        await eventually(lambda: _has_rows(results_db), "the first consumer committed some rows")
        victim.send_signal(signal.SIGKILL)
        assert await exit_code(victim, log) == -signal.SIGKILL
    assert await row_count(results_db) < len(tasks), "the kill came too late to be mid-stream"

    await finish_with_fresh_consumer(model, env | {"DETFLEET_CONSUMER_ID": "successor"}, log)

    await assert_every_task_has_one_ok_row(results_db, tasks)
    rows = await rows_by_id(results_db)
    assert {r["consumer_id"] for r in rows.values()} == {"killed", "successor"}
    await assert_queues_empty(broker, QUEUE_BULK, QUEUE_RETRY_READY, QUEUE_DLQ)


async def _has_rows(database_url: str) -> bool:
    return await row_count(database_url) > 0


# ---- 2. SIGTERM ------------------------------------------------------------------------------------------

GRACE_S = 5.0


async def test_sigterm_drains_exits_0_within_the_grace_and_loses_nothing(
    broker: Broker, topology_settings: AdminSettings, results_db: str, tmp_path: Path
) -> None:
    model, log = tiny_model(tmp_path), tmp_path / "consumer.log"
    tasks = await publish_stream(broker, STREAM)
    env = consumer_env(topology_settings.amqp_url, results_db, shutdown_grace_s=str(GRACE_S))

    async with consumer_process(model, env, log) as process:
        await eventually(lambda: _has_rows(results_db), "the consumer committed some rows")
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert await exit_code(process, log) == 0, await read_log(log)
        assert time.monotonic() - signalled < GRACE_S, "the drain overran its grace period"

    # Everything not written is back in the broker, not held by a dead channel or lost.
    written = await row_count(results_db)
    assert written < len(tasks), "SIGTERM came too late to be mid-stream"
    assert await broker.queue_depth(QUEUE_BULK) == len(tasks) - written
    assert "Drained" in await read_log(log)

    await finish_with_fresh_consumer(model, env, log)

    await assert_every_task_has_one_ok_row(results_db, tasks)
    rows = await rows_by_id(results_db)
    assert sum(r["redeliveries"] for r in rows.values()) == 0  # every written row was acked before exit
    await assert_queues_empty(broker, QUEUE_BULK, QUEUE_RETRY_READY, QUEUE_DLQ)


async def test_a_second_sigterm_exits_at_once_and_a_fresh_consumer_loses_nothing(
    broker: Broker, topology_settings: AdminSettings, results_db: str, tmp_path: Path
) -> None:
    """The first signal starts a drain that cannot end (Postgres stalls the batch in flight, the grace is
    long); the second one must not wait for it."""
    model, log = tiny_model(tmp_path), tmp_path / "consumer.log"
    port = free_port()
    async with TcpProxy(port=POSTGRES_PORT) as postgres:
        env = consumer_env(
            topology_settings.amqp_url,
            via(postgres, results_db),
            shutdown_grace_s="120",
            health_port=str(port),
        )
        async with consumer_process(model, env, log) as process:
            await wait_for_status(port, "/readyz", 200)
            postgres.pause()  # the next write hangs: a batch stays in flight
            tasks = await publish_stream(broker, 20)
            await eventually(lambda: _queue_empty(broker, QUEUE_BULK), "the consumer took every frame")

            process.send_signal(signal.SIGTERM)
            await eventually(lambda: _logged(log, "Stopping: signal SIGTERM"), "the first signal landed")
            assert process.returncode is None, "the first signal must drain, not exit"
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            assert await exit_code(process, log) != 0
            assert time.monotonic() - signalled < GRACE_S, "the second signal did not exit at once"
        postgres.resume()

    assert await row_count(results_db) == 0
    await finish_with_fresh_consumer(model, consumer_env(topology_settings.amqp_url, results_db), log)
    await assert_every_task_has_one_ok_row(results_db, tasks)
    await assert_queues_empty(broker, QUEUE_BULK, QUEUE_RETRY_READY, QUEUE_DLQ)


async def _queue_empty(broker: Broker, queue: str) -> bool:
    return await broker.queue_depth(queue) == 0


async def _logged(log: Path, text: str) -> bool:
    return text in await read_log(log)


# ---- 3. Postgres outage ------------------------------------------------------------------------------------


async def test_postgres_outage_pauses_the_consumer_and_every_task_lands_once_after(
    broker: Broker, topology_settings: AdminSettings, results_db: str
) -> None:
    port = free_port()
    async with TcpProxy(port=POSTGRES_PORT) as postgres:
        settings = consumer_settings(
            topology_settings, via(postgres, results_db), health_port=port, exit_when_idle_s=None
        )
        async with running(settings, FakeDetector()) as worker:
            await wait_for_status(port, "/readyz", 200)
            first = make_task()
            await publish(broker, first, jpeg(1))
            await eventually(lambda: _has_rows(results_db), "the link works before the outage")

            postgres.refuse_new = True  # reconnects fail too, as with a database host that is down
            postgres.cut()
            during = [make_task() for _ in range(10)]
            for i, task in enumerate(during):
                await publish(broker, task, jpeg(10 + i))

            assert "database" in await wait_for_status(port, "/readyz", 503)
            await eventually(
                lambda: _all_back_in_broker(broker, worker, len(during)),
                "the consumer handed every frame back and stopped taking work",
            )
            assert await row_count(results_db) == 1
            assert await broker.queue_depth(QUEUE_DLQ) == 0

            postgres.refuse_new = False
            await wait_for_status(port, "/readyz", 200)
            await eventually(lambda: _rows_reach(results_db, 11), "every task landed after the outage")

    await assert_every_task_has_one_ok_row(results_db, [first, *during])
    rows = await rows_by_id(results_db)
    assert {r["attempt"] for r in rows.values()} == {1}  # an outage burns no retry attempt
    await assert_queues_empty(broker, QUEUE_BULK, QUEUE_RETRY_READY, QUEUE_DLQ)


async def test_repeated_postgres_outages_close_the_paused_channels(
    broker: Broker, topology_settings: AdminSettings, results_db: str
) -> None:
    """Every resume opens fresh channels; without closing the old ones a flapping database would walk the
    connection up to the broker's channel limit and lose it."""
    port = free_port()
    async with TcpProxy(port=POSTGRES_PORT) as postgres:
        settings = consumer_settings(
            topology_settings, via(postgres, results_db), health_port=port, exit_when_idle_s=None
        )
        async with running(settings, FakeDetector()) as worker:
            await wait_for_status(port, "/readyz", 200)
            steady = worker.open_channels()
            for outage in range(3):
                postgres.refuse_new = True
                postgres.cut()
                await publish(broker, make_task(), jpeg(outage))
                assert "database" in await wait_for_status(port, "/readyz", 503)
                postgres.refuse_new = False
                await wait_for_status(port, "/readyz", 200)
                await eventually(
                    functools.partial(_rows_reach, results_db, outage + 1), "the task landed on resume"
                )

            async def back_to_steady() -> bool:
                return worker.open_channels() == steady

            await eventually(back_to_steady, f"the channels of paused consumers closed (steady: {steady})")


async def test_a_batch_in_flight_through_a_postgres_outage_is_acked_on_its_own_channel(
    broker: Broker, topology_settings: AdminSettings, results_db: str
) -> None:
    """The resume opens new channels whose delivery tags start at 1 again, while a batch stuck in inference
    still holds tag 2 of the old one: its ack must go to the old channel, and acks nothing else.

    Each step waits on the event it needs, never on the scheduler: the first frame's inference is done and
    its write stalls in a paused link before the stuck frame is published; the stuck frame is in inference
    before the link is cut, which fails the first frame's write and pauses the worker."""
    detector = HeldDetector(hold_if=lambda image: float(image.mean()) > 250)
    port = free_port()
    async with TcpProxy(port=POSTGRES_PORT) as postgres:
        settings = consumer_settings(
            topology_settings,
            via(postgres, results_db),
            max_batch=1,
            batches_in_flight=2,
            prefetch=4,
            health_port=port,
        )
        worker = Worker(settings, detector)
        run = asyncio.create_task(worker.run())
        try:
            await wait_for_status(port, "/readyz", 200)
            first, stuck = make_task(), make_task()
            postgres.pause()  # the first frame's write waits in the link
            await publish(broker, first, jpeg(1))  # tag 1
            assert await asyncio.to_thread(detector.passed.wait, WAIT_S), "the first frame was inferred"
            await publish(broker, stuck, white_jpeg())  # tag 2: stays in inference until released
            assert await asyncio.to_thread(detector.started.wait, WAIT_S), "the stuck frame reached inference"
            postgres.refuse_new = True
            postgres.cut()  # the first frame's write fails: the worker pauses
            postgres.resume()
            await eventually(
                lambda: _paused_holding_the_stuck_batch(broker, worker, detector),
                "the worker paused, holding only the stuck batch",
            )

            postgres.refuse_new = False
            later = [make_task() for _ in range(2)]
            for i, task in enumerate(later):
                await publish(broker, task, jpeg(2 + i))
            await wait_for_status(port, "/readyz", 200)
            await eventually(lambda: _queue_empty(broker, QUEUE_BULK), "the resumed worker took the rest")

            detector.release.set()
            assert await asyncio.wait_for(run, RUN_TIMEOUT_S) == 0
        finally:
            detector.release.set()
            worker.request_stop("test done")
            await asyncio.wait_for(run, RUN_TIMEOUT_S)

    # Had the stuck message's ack gone astray, closing the connection would have handed it back.
    await assert_queues_empty(broker, QUEUE_BULK, QUEUE_RETRY_READY, QUEUE_DLQ)
    await assert_every_task_has_one_ok_row(results_db, [first, stuck, *later])
    rows = await rows_by_id(results_db)
    assert sum(r["redeliveries"] for r in rows.values()) == 0


async def _paused_holding_the_stuck_batch(broker: Broker, worker: Worker, detector: HeldDetector) -> bool:
    return detector.started.is_set() and await _all_back_in_broker(broker, worker, 1, held=1)


async def _all_back_in_broker(broker: Broker, worker: Worker, count: int, held: int = 0) -> bool:
    return worker.held() == held and await broker.queue_depth(QUEUE_BULK) == count


async def _rows_reach(database_url: str, count: int) -> bool:
    return await row_count(database_url) >= count


# ---- 4. a message the client cannot decode -----------------------------------------------------------------


def publish_with_pika(url: str, messages: Sequence[tuple[Task, pika.BasicProperties]]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for task, properties in messages:
            channel.basic_publish(EXCHANGE_FRAMES, task.routing_key, jpeg(3), properties, mandatory=True)
    finally:
        connection.close()


def pika_properties(task: Task, timestamp: int) -> pika.BasicProperties:
    """The properties of a valid task, with ``timestamp`` sent as given (aiormq cannot decode 2**62)."""
    return pika.BasicProperties(
        message_id=str(task.task_id),
        app_id=task.producer,
        timestamp=timestamp,
        delivery_mode=2,
        headers=task.headers(),
    )


async def test_an_undecodable_timestamp_is_dead_lettered_without_a_crash_loop(
    broker: Broker, topology_settings: AdminSettings, results_db: str
) -> None:
    good = [make_task() for _ in range(6)]
    bad = make_task()
    now = int(time.time())
    messages = [(t, pika_properties(t, now)) for t in good[:3]]
    messages += [(bad, pika_properties(bad, 2**62))]
    messages += [(t, pika_properties(t, now)) for t in good[3:]]
    await asyncio.to_thread(publish_with_pika, topology_settings.amqp_url, messages)

    await run_until_idle(consumer_settings(topology_settings, results_db), FakeDetector())

    rows = await rows_by_id(results_db)
    assert set(rows) == {t.task_id for t in [*good, bad]}
    assert all(rows[t.task_id]["status"] == "ok" for t in good)
    failed = rows[bad.task_id]
    assert failed["status"] == "failed"
    assert "timestamp property" in failed["reason"]
    [entry] = await drain_queue(broker, QUEUE_DLQ)
    assert entry.message_id == str(bad.task_id)
    assert entry.headers[H_REASON] == failed["reason"]
    await assert_queues_empty(broker, QUEUE_BULK, QUEUE_RETRY_READY)


# ---- 5. hold-time limit ------------------------------------------------------------------------------------


class HeldDetector(FakeDetector):
    """A fake whose inference of a batch with an image ``hold_if`` accepts waits until the test releases
    it: a batch stuck in flight."""

    def __init__(self, hold_if: Callable[[np.ndarray], bool] = lambda _: True) -> None:
        super().__init__()
        self.hold_if = hold_if
        self.started = threading.Event()
        self.release = threading.Event()
        self.passed = threading.Event()  # a batch without a held image was inferred

    def detect(self, frames: Sequence[DecodedFrame]) -> list[list[Detection]]:
        held = any(self.hold_if(frame.pixels) for frame in frames)
        if held:
            self.started.set()
            assert self.release.wait(WAIT_S)
        found = super().detect(frames)
        if not held:
            self.passed.set()
        return found


async def test_messages_waiting_behind_a_stuck_batch_go_back_to_the_broker_after_max_hold(
    broker: Broker, topology_settings: AdminSettings, results_db: str
) -> None:
    detector = HeldDetector()
    settings = consumer_settings(
        topology_settings, results_db, max_batch=1, batches_in_flight=1, prefetch=2, max_hold_s=1.0
    )
    tasks = [make_task() for _ in range(4)]
    for i, task in enumerate(tasks):
        await publish(broker, task, jpeg(i))
    worker = Worker(settings, detector)
    run = asyncio.create_task(worker.run())
    try:
        assert await asyncio.to_thread(detector.started.wait, WAIT_S)
        await eventually(lambda: _holds(worker, 2), "the worker holds a stuck batch and one waiting")

        # Another replica takes what is ready, then whatever the stuck worker hands back.
        async with other_replica(topology_settings.amqp_url) as taken:
            await eventually(lambda: _any_redelivered(taken), "a held message came back through the broker")
            assert len({d.envelope.message_id for d in taken}) == len(taken) == 3
            assert worker.held() == 1  # only the batch in flight is still held

        detector.release.set()
        assert await asyncio.wait_for(run, RUN_TIMEOUT_S) == 0
    finally:
        detector.release.set()
        worker.request_stop("test done")
        await asyncio.wait_for(run, RUN_TIMEOUT_S)

    await assert_every_task_has_one_ok_row(results_db, tasks)
    await assert_queues_empty(broker, QUEUE_BULK, QUEUE_DLQ)


@contextlib.asynccontextmanager
async def other_replica(amqp_url: str) -> AsyncIterator[list[Delivery]]:
    """A consumer on the bulk lane that holds whatever it receives; closing it hands everything back."""
    replica = await Broker.connect(amqp_url, f"test:other-replica-{uuid.uuid4().hex[:6]}", robust=False)
    taken: list[Delivery] = []

    async def hold(delivery: Delivery) -> None:
        taken.append(delivery)

    try:
        await replica.consume(QUEUE_BULK, hold, prefetch=10)
        yield taken
    finally:
        await replica.close()


async def _holds(worker: Worker, count: int) -> bool:
    return worker.held() == count


async def _any_redelivered(taken: list[Delivery]) -> bool:
    return any(d.envelope.redelivered for d in taken)
