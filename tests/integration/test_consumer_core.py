"""The consumer core's promises against the real RabbitMQ and Postgres: one DLQ entry per failed task through
a cut between the DLQ confirm and the ack, a stable id for a message without one, failed rows that keep what
could be read, crash loops contained, and out-of-memory batches split instead of dead-lettered."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pika
import pytest

from consumer.detector.base import DecodedFrame, Detection, InferenceError
from consumer.detector.fake import FakeDetector
from consumer.settle import Settler
from shared.broker.aio import Broker
from shared.schema import H_CAPTURED_AT, H_REASON
from shared.settings import AdminSettings
from shared.topology import EXCHANGE_FRAMES, QUEUE_BULK, QUEUE_DLQ, QUEUE_RETRY_READY
from tests.integration.consumer_support import (
    RUN_TIMEOUT_S,
    consumer_settings,
    drain_queue,
    jpeg,
    make_task,
    publish,
    rows_by_id,
    run_until_idle,
    white_jpeg,
)
from tests.integration.test_consumer_faults import assert_queues_empty, consumer_env
from tests.support.crashing_consumer import CRASH_EXIT_CODE
from tests.support.proxy import TcpProxy

REPO = Path(__file__).resolve().parents[2]
CORRUPT_JPEG = b"\xff\xd8\xff\xe0 cut off before any frame header"


async def publish_envelope(broker: Broker, envelope: object) -> None:
    await broker.publish(envelope, EXCHANGE_FRAMES)  # type: ignore[arg-type]


# ---- one DLQ entry per failed task ------------------------------------------------------------------------


async def test_a_cut_between_the_dlq_confirm_and_the_ack_leaves_one_dlq_entry_per_failed_task(
    broker: Broker, topology_settings: AdminSettings, results_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = [make_task() for _ in range(17)]
    good = [make_task() for _ in range(5)]
    for task in bad:
        await publish(broker, task, CORRUPT_JPEG)
    nameless = dataclasses.replace(make_task().to_envelope(CORRUPT_JPEG), message_id=None)
    await publish_envelope(broker, nameless)
    for task in good:
        await publish(broker, task, jpeg(1))

    cuts: list[int] = []
    record = Settler._record_dead_lettered

    async def cut_after_the_record(self: Settler, task_ids: list[uuid.UUID]) -> None:
        await record(self, task_ids)
        if task_ids and not cuts:  # the copies are confirmed and recorded, the acks not yet sent
            cuts.append(proxy.cut())

    monkeypatch.setattr(Settler, "_record_dead_lettered", cut_after_the_record)
    async with TcpProxy() as proxy:
        # One batch in flight: the cut then lands after every copy in flight was confirmed. A copy whose
        # confirm the cut itself swallows is a duplicate no consumer can avoid (docs/message-flow.md).
        amqp_url = proxy.amqp_url(topology_settings.amqp_url)
        settings = consumer_settings(
            topology_settings, results_db, amqp_url=amqp_url, prefetch=32, batches_in_flight=1
        )
        await run_until_idle(settings, FakeDetector())

    assert cuts == [2], "the cut must land once, on the consuming and publishing connections"
    rows = await rows_by_id(results_db)
    failed = {str(task_id) for task_id, row in rows.items() if row["status"] == "failed"}
    assert len(failed) == len(bad) + 1
    assert {str(t.task_id) for t in bad} <= failed
    entries = Counter(entry.message_id for entry in await drain_queue(broker, QUEUE_DLQ))
    assert set(entries) == failed  # the nameless message's entry carries its row's id
    assert set(entries.values()) == {1}
    assert sum(row["redeliveries"] for row in rows.values()) >= 1, "the cut redelivered what failed"
    assert all(rows[uuid.UUID(i)]["dlq_confirmed_at"] is not None for i in failed)
    assert {rows[t.task_id]["status"] for t in good} == {"ok"}


# ---- a stable id for a message without a usable one -------------------------------------------------------


def publish_nameless_with_pika(url: str, routing_key: str, headers: dict[str, object]) -> None:
    """A frame with no message_id and a timestamp the consumer's client cannot decode (swept aside)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        properties = pika.BasicProperties(timestamp=2**62, delivery_mode=2, headers=headers)
        channel.basic_publish(EXCHANGE_FRAMES, routing_key, jpeg(4), properties, mandatory=True)
    finally:
        connection.close()


async def test_a_message_without_message_id_keeps_one_id_through_the_quarantine_sweep(
    broker: Broker, topology_settings: AdminSettings, results_db: str
) -> None:
    task = make_task()
    headers = task.headers()
    await asyncio.to_thread(publish_nameless_with_pika, topology_settings.amqp_url, task.routing_key, headers)

    await run_until_idle(consumer_settings(topology_settings, results_db), FakeDetector())

    rows = await rows_by_id(results_db)
    [(task_id, row)] = rows.items()
    assert row["status"] == "failed"
    [entry] = await drain_queue(broker, QUEUE_DLQ)
    assert entry.message_id == str(task_id)
    assert entry.headers[H_REASON] == row["reason"]
    assert (row["camera_id"], row["site"], row["lane"]) == (task.camera_id, task.site, "bulk")


# ---- failed rows keep what could be read ------------------------------------------------------------------


async def test_a_failed_row_keeps_the_camera_site_lane_trace_and_producer_it_could_read(
    broker: Broker, topology_settings: AdminSettings, results_db: str
) -> None:
    task = make_task(camera="cam-7", producer="gateway-3")
    envelope = task.to_envelope(jpeg(2))
    await publish_envelope(
        broker, dataclasses.replace(envelope, headers={**envelope.headers, H_CAPTURED_AT: "noon"})
    )

    await run_until_idle(consumer_settings(topology_settings, results_db), FakeDetector())

    row = (await rows_by_id(results_db))[task.task_id]
    assert row["status"] == "failed"
    assert "captured_at" in row["reason"]
    assert (row["camera_id"], row["site"], row["lane"]) == ("cam-7", "site-a", "bulk")
    assert (row["trace_id"], row["producer"], row["captured_at"]) == (task.trace_id, "gateway-3", None)


# ---- crash loops ------------------------------------------------------------------------------------------

MAX_CRASHES = 2


async def run_crashing_replica(env: dict[str, str], log: Path) -> int:
    with log.open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.support.crashing_consumer", env=env, stdout=output, stderr=output
        )
    try:
        return await asyncio.wait_for(process.wait(), RUN_TIMEOUT_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_frame_that_kills_the_consumer_is_failed_after_max_crashes_and_nothing_else_is_harmed(
    broker: Broker, topology_settings: AdminSettings, results_db: str, tmp_path: Path
) -> None:
    good = [make_task() for _ in range(12)]
    poison = make_task()
    for task in good[:6]:
        await publish(broker, task, jpeg(5))
    await publish(broker, poison, white_jpeg())
    for task in good[6:]:
        await publish(broker, task, jpeg(6))
    env = consumer_env(
        topology_settings.amqp_url,
        results_db,
        max_batch="4",
        prefetch="8",
        exit_when_idle_s="0.5",
        max_crashes=str(MAX_CRASHES),
    ) | {"PYTHONPATH": str(REPO)}
    log = tmp_path / "replicas.log"

    codes: list[int] = []
    while not codes or codes[-1] != 0:  # restart the replica the way an orchestrator would
        codes.append(await run_crashing_replica(env, log))
        assert len(codes) <= MAX_CRASHES + 2, f"crash loop not contained: {codes}\n{log.read_text()}"

    # The first delivery ran in a full batch (first deliveries are not marked); then each marked start.
    assert codes == [CRASH_EXIT_CODE] * (MAX_CRASHES + 1) + [0], log.read_text()
    rows = await rows_by_id(results_db)
    assert set(rows) == {t.task_id for t in [*good, poison]}
    assert rows[poison.task_id]["status"] == "failed"
    assert rows[poison.task_id]["reason"] == f"crashed the consumer {MAX_CRASHES} times"
    assert {rows[t.task_id]["status"] for t in good} == {"ok"}
    [entry] = await drain_queue(broker, QUEUE_DLQ)
    assert entry.message_id == str(poison.task_id)
    await assert_queues_empty(broker, QUEUE_BULK, QUEUE_RETRY_READY)


# ---- out of memory ----------------------------------------------------------------------------------------

FITS = 4


class SmallMemoryDetector(FakeDetector):
    """Fails every batch over :data:`FITS` images the way ONNX Runtime's CPU arena words it."""

    def __init__(self) -> None:
        super().__init__()
        self.succeeded: list[int] = []

    def detect(self, images: Sequence[DecodedFrame]) -> list[list[Detection]]:
        if len(images) > FITS:
            raise InferenceError(
                f"model.onnx: Failed to allocate memory for requested buffer of {len(images)}"
            )
        self.succeeded.append(len(images))
        return super().detect(images)


async def test_an_out_of_memory_batch_is_split_and_smaller_batches_follow_without_a_dead_letter(
    broker: Broker, topology_settings: AdminSettings, results_db: str
) -> None:
    tasks = [make_task() for _ in range(40)]
    for i, task in enumerate(tasks):
        await publish(broker, task, jpeg(i))
    detector = SmallMemoryDetector()
    settings = consumer_settings(topology_settings, results_db, max_batch=16, prefetch=40, max_wait_ms=500)

    worker = await run_until_idle(settings, detector)

    rows = await rows_by_id(results_db)
    assert {rows[t.task_id]["status"] for t in tasks} == {"ok"}
    assert {rows[t.task_id]["attempt"] for t in tasks} == {1}  # split at once, never retried
    assert max(detector.succeeded) <= FITS
    assert worker.batcher.limit.current <= FITS
    assert (worker.metrics.registry.get_sample_value("detfleet_batch_limit") or 0) <= FITS
    await assert_queues_empty(broker, QUEUE_DLQ, QUEUE_RETRY_READY)
