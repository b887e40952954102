"""`detfleet dlq` against the real broker and Postgres, with failures the real consumer made.

Three reasons from two cameras: inference failing on white frames (cam-1, site-a), bodies that are no image
(cam-2, site-b) and bulk tasks past their deadline (both cameras).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from consumer.detector.fake import FakeDetector
from detfleet import dlq
from detfleet.dlq_index import Filters, failed_tasks
from shared import admin, db
from shared.broker.aio import Broker
from shared.schema import H_ATTEMPT, H_REASON, H_REPLAYS, Task, dead_letter_copy
from shared.settings import AdminSettings
from shared.topology import EXCHANGE_DLQ, QUEUE_BULK, QUEUE_DLQ
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
from tests.integration.test_consumer_faults import eventually


@dataclass(frozen=True)
class Failures:
    settings: AdminSettings
    database_url: str
    audit_log: Path
    inference: set[uuid.UUID]
    bad_input: set[uuid.UUID]
    deadline: set[uuid.UUID]

    @property
    def everything(self) -> set[uuid.UUID]:
        return self.inference | self.bad_input | self.deadline

    def env(self) -> dict[str, str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("DETFLEET_")}
        return clean | {
            "DETFLEET_AMQP_URL": self.settings.amqp_url,
            "DETFLEET_DATABASE_URL": self.database_url,
            "DETFLEET_AUDIT_LOG": str(self.audit_log),
            "DETFLEET_LOG_LEVEL": "WARNING",
        }

    def audit_lines(self) -> list[dict[str, object]]:
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines()]


async def cli(failures: Failures, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "detfleet",
        "dlq",
        *args,
        env=failures.env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT_S)
    return process.returncode or 0, out.decode(), err.decode()


async def listed(failures: Failures, *args: str) -> set[uuid.UUID]:
    code, out, err = await cli(failures, "list", "--json", "--limit", "100", *args)
    assert (code, err) == (0, ""), err
    return {uuid.UUID(item["task_id"]) for item in json.loads(out)}


def past_deadline(camera: str, site: str) -> Task:
    return make_task(camera=camera, site=site, deadline=datetime.now(UTC) - timedelta(seconds=5))


@pytest.fixture
async def failures(topology_settings: AdminSettings, results_db: str, tmp_path: Path) -> Failures:
    settings = topology_settings.model_copy(update={"retry_delays_ms": (50,)})
    await admin.apply_topology(settings)
    inference = [make_task(camera="cam-1") for _ in range(2)]
    bad = [make_task(camera="cam-2", site="site-b") for _ in range(2)]
    late = [
        past_deadline("cam-1", "site-a"),
        past_deadline("cam-2", "site-b"),
        past_deadline("cam-2", "site-b"),
    ]
    fine = make_task(camera="cam-1")
    broker = await Broker.connect(settings.amqp_url, "test:dlq-failures")
    try:
        for task in inference:
            await publish(broker, task, white_jpeg())
        for task in bad:
            await publish(broker, task, b"this is not an image")
        for task in [*late, fine]:
            await publish(broker, task, jpeg(3))
    finally:
        await broker.close()
    worker_settings = consumer_settings(settings, results_db, max_retries=0)
    await run_until_idle(worker_settings, FakeDetector(fail_on=lambda image: float(image.mean()) > 250))
    return Failures(
        settings,
        results_db,
        tmp_path / "audit.jsonl",
        {t.task_id for t in inference},
        {t.task_id for t in bad},
        {t.task_id for t in late},
    )


async def dlq_ids(broker: Broker) -> list[uuid.UUID]:
    """Every entry now in the DLQ, taken out (the end of a test)."""
    return [uuid.UUID(str(e.message_id)) for e in await drain_queue(broker, QUEUE_DLQ)]


async def test_list_filters_by_reason_camera_site_and_age_and_leaves_the_broker_alone(
    failures: Failures, broker: Broker
) -> None:
    assert await listed(failures) == failures.everything
    assert await listed(failures, "--reason", "INFERENCE failed") == failures.inference
    assert await listed(failures, "--reason", "deadline") == failures.deadline
    assert await listed(failures, "--camera", "cam-1") == failures.inference | {
        t for t in failures.deadline if t in await listed(failures, "--site", "site-a")
    }
    assert len(await listed(failures, "--camera", "cam-2")) == 4
    assert await listed(failures, "--site", "site-b") == await listed(failures, "--camera", "cam-2")
    old = next(iter(failures.bad_input))
    conn = await asyncpg.connect(failures.database_url)
    try:
        await conn.execute(
            "UPDATE detfleet_results SET completed_at = now() - interval '2 hours' WHERE task_id = $1", old
        )
    finally:
        await conn.close()
    assert await listed(failures, "--since", "1h") == failures.everything - {old}
    assert await listed(failures, "--older-than", "1h") == {old}

    code, out, _ = await cli(failures, "list", "--json", "--camera", "cam-1")
    first = json.loads(out)[0]
    assert code == 0
    assert first["routing_key"].startswith("bulk.site-a.cam-1")
    assert first["dlq_state"] == "parked"

    # Listing read Postgres only: every entry is still there, never delivered.
    entries = await drain_queue(broker, QUEUE_DLQ)
    assert {uuid.UUID(str(e.message_id)) for e in entries} == failures.everything
    assert not any(e.redelivered for e in entries)


async def test_replay_by_reason_brings_back_only_those_and_they_become_ok(failures: Failures) -> None:
    code, out, err = await cli(failures, "replay", "--reason", "inference", "--dry-run")
    assert code == 0, err
    assert "would replay 2 tasks" in out
    assert failures.audit_lines() == []

    code, out, err = await cli(failures, "replay", "--reason", "inference", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["sent"], report["selected"], report["not_in_dlq"]) == (2, 2, 0)

    # The cause is gone (a detector that no longer fails): the replayed tasks end as ok rows.
    settings = consumer_settings(failures.settings, failures.database_url, max_retries=0)
    await run_until_idle(settings, FakeDetector())
    rows = await rows_by_id(failures.database_url)
    assert {t for t in failures.inference if rows[t]["status"] == "ok"} == failures.inference
    assert all(rows[t]["status"] == "failed" for t in failures.bad_input | failures.deadline)
    broker = await Broker.connect(failures.settings.amqp_url, "test:dlq-check")
    try:
        assert set(await dlq_ids(broker)) == failures.bad_input | failures.deadline
    finally:
        await broker.close()
    [line] = failures.audit_lines()
    assert (line["action"], line["sent"], line["filter"]) == ("replay", 2, {"reason": "inference"})
    assert {"who", "host", "at"} <= set(line)


async def test_purge_removes_only_what_it_matched(failures: Failures, broker: Broker) -> None:
    code, _, err = await cli(failures, "purge", "--camera", "cam-2")
    assert code == 2, "purge without --yes is a usage error"
    assert "--yes" in err

    code, out, err = await cli(failures, "purge", "--camera", "cam-2", "--yes", "--json")
    assert code == 0, err
    assert json.loads(out)["removed"] == 4

    cam2 = await listed(failures, "--camera", "cam-2")
    _, out, _ = await cli(failures, "list", "--json", "--camera", "cam-2")
    assert {item["dlq_state"] for item in json.loads(out)} == {"purged"}
    remaining = set(await dlq_ids(broker))
    assert remaining == failures.everything - cam2
    assert [line["action"] for line in failures.audit_lines()] == ["purge"]


async def test_show_and_export_fetch_payloads_and_leave_them(
    failures: Failures, broker: Broker, tmp_path: Path
) -> None:
    task_id = next(iter(failures.bad_input))
    image = tmp_path / "body.bin"
    code, out, err = await cli(failures, "show", str(task_id), "--json", "--save-image", str(image))
    assert code == 0, err
    shown = json.loads(out)
    assert shown["row"]["status"] == "failed"
    assert shown["entry"]["headers"][H_REASON] == shown["row"]["reason"]
    assert image.read_bytes() == b"this is not an image"

    code, out, err = await cli(failures, "export", "--reason", "inference", "--to", str(tmp_path / "out"))
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == sorted(
        [f"{t}.jpg" for t in failures.inference] + [f"{t}.json" for t in failures.inference]
    )
    sidecar = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert sidecar["row"]["reason"].startswith("inference failed")
    assert set(await dlq_ids(broker)) == failures.everything


# ---- parked entries made by hand: replay's resume and replay limit -------------------------------------


async def park(broker: Broker, database_url: str, replays: int = 0) -> Task:
    """A failed row and its DLQ entry, as the consumer leaves them."""
    task = make_task(camera="cam-9")
    envelope = task.to_envelope(jpeg(1))
    if replays:
        envelope = envelope.republished(**{H_REPLAYS: replays})
    copy = dead_letter_copy(envelope, "inference failed", attempt=4, failed_at=datetime.now(UTC))
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO detfleet_results (task_id, camera_id, site, lane, received_at, completed_at,"
            " status, reason, consumer_id)"
            " VALUES ($1, $2, $3, 'bulk', now(), now(), 'failed', 'inference failed', 't')",
            task.task_id,
            task.camera_id,
            task.site,
        )
    finally:
        await conn.close()
    await broker.publish(copy, EXCHANGE_DLQ)
    return task


@pytest.fixture
def parked_env(topology_settings: AdminSettings, results_db: str, tmp_path: Path) -> Failures:
    return Failures(topology_settings, results_db, tmp_path / "audit.jsonl", set(), set(), set())


async def ledger_count(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM detfleet_dlq_ledger")
        return count
    finally:
        await conn.close()


async def test_an_interrupted_replay_resumes_without_sending_anything_twice(
    parked_env: Failures, broker: Broker
) -> None:
    tasks = [await park(broker, parked_env.database_url) for _ in range(6)]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "detfleet", "dlq", "replay", "--all", "--rate", "2", env=parked_env.env()
    )

    async def two_sent() -> bool:
        return await ledger_count(parked_env.database_url) >= 2

    await eventually(two_sent, "the replay sent two copies", RUN_TIMEOUT_S)
    process.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(process.wait(), RUN_TIMEOUT_S) == 130
    sent_first = await ledger_count(parked_env.database_url)
    assert 2 <= sent_first < 6

    code, out, err = await cli(parked_env, "replay", "--all", "--json")
    assert code == 0, err
    assert json.loads(out)["sent"] == 6 - sent_first

    back = await drain_queue(broker, QUEUE_BULK)
    assert sorted(str(e.message_id) for e in back) == sorted(str(t.task_id) for t in tasks)
    assert {e.headers[H_REPLAYS] for e in back} == {1}
    assert {e.headers[H_ATTEMPT] for e in back} == {1}
    assert await broker.queue_depth(QUEUE_DLQ) == 0
    assert [line["action"] for line in parked_env.audit_lines()] == ["replay", "replay"]


async def test_an_entry_sent_before_a_crash_is_removed_without_a_second_send(
    parked_env: Failures, broker: Broker
) -> None:
    task = await park(broker, parked_env.database_url)
    conn = await db.connect(parked_env.database_url)
    try:
        # The crash came after the broker confirmed the copy and the ledger recorded it, before the ack.
        await conn.execute(
            "INSERT INTO detfleet_dlq_ledger (task_id, replay, action) VALUES ($1, 1, 'replayed')",
            task.task_id,
        )
        tasks = await failed_tasks(conn, Filters(ids=(task.task_id,)))
        report = await dlq.replay(broker, conn, "classic", tasks, dlq.ReplayOptions())
    finally:
        await conn.close()
    assert (report.sent, report.already_sent) == (0, 1)
    assert await broker.queue_depth(QUEUE_DLQ) == 0
    assert await broker.queue_depth(QUEUE_BULK) == 0


async def test_a_task_replayed_too_often_is_refused_unless_forced(
    parked_env: Failures, broker: Broker
) -> None:
    task = await park(broker, parked_env.database_url, replays=3)
    code, out, err = await cli(parked_env, "replay", "--id", str(task.task_id), "--json")
    assert code == 0, err
    assert (json.loads(out)["sent"], json.loads(out)["refused"]) == (0, 1)
    assert await broker.queue_depth(QUEUE_DLQ) == 1

    code, out, err = await cli(parked_env, "replay", "--id", str(task.task_id), "--force", "--json")
    assert code == 0, err
    assert json.loads(out)["sent"] == 1
    [back] = await drain_queue(broker, QUEUE_BULK)
    assert back.headers[H_REPLAYS] == 4


async def test_a_replayed_task_that_fails_again_gets_one_new_dlq_entry(failures: Failures) -> None:
    code, _, err = await cli(failures, "replay", "--reason", "inference")
    assert code == 0, err

    # The cause is still there: the replayed tasks fail again and are parked once more, once each.
    settings = consumer_settings(failures.settings, failures.database_url, max_retries=0)
    await run_until_idle(settings, FakeDetector(fail_on=lambda image: float(image.mean()) > 250))

    rows = await rows_by_id(failures.database_url)
    assert all(rows[t]["status"] == "failed" for t in failures.inference)
    assert all(rows[t]["dlq_confirmed_at"] is not None for t in failures.inference)
    broker = await Broker.connect(failures.settings.amqp_url, "test:dlq-check")
    try:
        parked = await dlq_ids(broker)
    finally:
        await broker.close()
    assert sorted(parked) == sorted(failures.everything)  # one entry each, the replayed ones included
