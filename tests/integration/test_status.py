"""`detfleet status` against the real broker and Postgres: a known set-up, reported exactly.

Thirty frames wait in the bulk lane; two consumers hold five each unacked (prefetch 5, never settled); the
results database has rows from two replicas running different models in the window and one older row.
RabbitMQ refreshes the management API's figures every few seconds, so the test first polls the API until it
shows the set-up (depths, consumers, and the publish and delivery rates settled back to zero).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from detfleet.scale_advice import NO_ARRIVAL_RATE
from shared.broker.aio import Broker, Delivery, Subscription
from shared.management import Management, rate_of
from shared.settings import DEFAULT_MANAGEMENT_URL, AdminSettings
from shared.topology import QUEUE_BULK, Topology, vhost_of
from tests.integration.consumer_support import RUN_TIMEOUT_S, jpeg, make_task, publish
from tests.integration.test_cli_errors import closed_port
from tests.integration.test_consumer_faults import eventually

FRAMES, CONSUMERS, PREFETCH = 30, 2, 5
HELD = CONSUMERS * PREFETCH
SHA_A, SHA_B, SHA_OLD = "a" * 64, "b" * 64, "c" * 64
STATS_WAIT_S = 90  # the management API samples every 5 s; rates need two quiet samples to read zero


@dataclass(frozen=True)
class SetUp:
    settings: AdminSettings
    database_url: str

    def env(self, **changes: str) -> dict[str, str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("DETFLEET_")}
        return clean | {
            "DETFLEET_AMQP_URL": self.settings.amqp_url,
            "DETFLEET_DATABASE_URL": self.database_url,
            "DETFLEET_MANAGEMENT_URL": DEFAULT_MANAGEMENT_URL,
            "DETFLEET_LOG_LEVEL": "WARNING",
            **changes,
        }


async def status(setup: SetUp, *args: str, **env: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "detfleet",
        "status",
        *args,
        env=setup.env(**env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT_S)
    return process.returncode or 0, out.decode(), err.decode()


@pytest.fixture
async def held(broker: Broker) -> AsyncIterator[list[Delivery]]:
    """FRAMES bulk frames published; CONSUMERS consumers each holding PREFETCH of them unacked."""
    for _ in range(FRAMES):
        await publish(broker, make_task("bulk"), jpeg(1))
    deliveries: list[Delivery] = []

    async def hold(delivery: Delivery) -> None:
        deliveries.append(delivery)

    subscriptions: list[Subscription] = [
        await broker.consume(QUEUE_BULK, hold, PREFETCH) for _ in range(CONSUMERS)
    ]

    async def all_held() -> bool:
        return len(deliveries) == HELD

    await eventually(all_held, f"{HELD} deliveries are held")
    yield deliveries
    for subscription in subscriptions:
        await subscription.close()


async def insert_rows(database_url: str) -> None:
    """Rows of two replicas 10 s ago (in the last minute and the window), and one from 10 minutes ago."""
    rows: list[tuple[str, str, str, str | None, bool, int]] = [
        # consumer, sha256, status, reason, DLQ copy confirmed, age in seconds
        *[("replica-a", SHA_A, "ok", None, False, 10)] * 120,
        *[("replica-b", SHA_B, "ok", None, False, 10)] * 50,
        *[("replica-b", SHA_B, "failed", "not a JPEG", True, 10)] * 3,
        ("replica-b", SHA_B, "failed", "inference failed", True, 10),
        ("replica-b", SHA_B, "failed", "inference failed", False, 10),  # no DLQ copy confirmed
        *[("replica-b", SHA_B, "shed", "past its deadline", False, 10)] * 5,
        ("replica-old", SHA_OLD, "failed", "past its deadline", True, 600),
    ]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.executemany(
            """
            INSERT INTO detfleet_results (task_id, received_at, completed_at, status, reason, consumer_id,
                                          model_sha256, lane, dlq_confirmed_at)
            VALUES ($1, now() - make_interval(secs => $2), now() - make_interval(secs => $2), $3, $4, $5,
                    $6, 'bulk', CASE WHEN $7 THEN now() END)
            """,
            [(uuid.uuid4(), float(age), st, why, who, sha, dlq) for who, sha, st, why, dlq, age in rows],
        )
    finally:
        await conn.close()


async def management_shows_the_set_up(settings: AdminSettings) -> None:
    async with Management(DEFAULT_MANAGEMENT_URL) as api:

        async def settled() -> bool:
            bulk = await api.queue(vhost_of(settings.amqp_url), QUEUE_BULK)
            return (
                bulk.get("messages_ready") == FRAMES - HELD
                and bulk.get("messages_unacknowledged") == HELD
                and bulk.get("consumers") == CONSUMERS
                and rate_of(bulk, "publish") == 0.0
                and rate_of(bulk, "deliver_get") == 0.0
            )

        await eventually(settled, "the management API shows the set-up, rates settled", STATS_WAIT_S)


def queue_rows(settings: AdminSettings, via_management: bool) -> list[dict[str, Any]]:
    rows = []
    for spec in Topology.from_settings(settings).queues:
        bulk = spec.name == QUEUE_BULK
        row: dict[str, Any] = {
            "name": spec.name,
            "ready": FRAMES - HELD if bulk else 0,
            "consumers": CONSUMERS if bulk else 0,
            "unacked": None,
            "in_rate": None,
            "out_rate": None,
        }
        if via_management:
            row |= {"unacked": HELD if bulk else 0, "in_rate": 0.0, "out_rate": 0.0}
        rows.append(row)
    return rows


EXPECTED_ROWS: dict[str, Any] = {
    "rows_last_minute": {"ok": 170, "failed": 5, "shed": 5},
    "dlq_by_reason": {"not a JPEG": 3, "inference failed": 1, "past its deadline": 1},
    "window_s": 300.0,
    "consumers_seen": [
        {"consumer_id": "replica-a", "model_sha256": SHA_A, "rows": 120},
        {"consumer_id": "replica-b", "model_sha256": SHA_B, "rows": 60},
    ],
    "models": [SHA_A, SHA_B],
    "mixed_fleet": True,
}


async def test_status_json_reports_depths_consumers_rows_and_advice(
    topology_settings: AdminSettings, results_db: str, held: list[Delivery]
) -> None:
    setup = SetUp(topology_settings, results_db)
    await management_shows_the_set_up(topology_settings)
    await insert_rows(results_db)

    code, out, err = await status(setup, "--json", "--drain-within", "10s")

    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "vhost": vhost_of(topology_settings.amqp_url),
        "management_api": True,
        "queues": queue_rows(topology_settings, via_management=True),
        **EXPECTED_ROWS,
        # 180 rows from 2 replicas in 300 s: 0.3 a second each. Nothing arrives now: 0 keep up; the
        # backlog of 30 (20 ready, 10 unacked) in 10 s is 3 a second: 10 replicas.
        "advice": {
            "per_replica_rate": 0.3,
            "arrival_rate": 0.0,
            "backlog": FRAMES,
            "drain_within_s": 10.0,
            "replicas_to_keep_up": 0,
            "replicas_to_drain": 10,
            "note": None,
        },
        "missing": [],
    }


async def test_without_the_management_api_it_reports_what_amqp_sees_and_what_is_missing(
    topology_settings: AdminSettings, results_db: str, held: list[Delivery]
) -> None:
    setup = SetUp(topology_settings, results_db)
    await insert_rows(results_db)
    unreachable = f"http://guest:secret@127.0.0.1:{closed_port()}/"

    code, out, err = await status(setup, "--json", DETFLEET_MANAGEMENT_URL=unreachable)

    assert (code, err) == (0, "")
    report = json.loads(out)
    [missing] = report.pop("missing")
    assert missing.startswith(f"management API {unreachable.replace('secret', '****')} unreachable")
    assert "secret" not in out
    assert report == {
        "vhost": vhost_of(topology_settings.amqp_url),
        "management_api": False,
        "queues": queue_rows(topology_settings, via_management=False),
        **EXPECTED_ROWS,
        "advice": {
            "per_replica_rate": 0.3,
            "arrival_rate": None,
            "backlog": FRAMES - HELD,  # ready only: AMQP does not count unacked messages
            "drain_within_s": 900.0,
            "replicas_to_keep_up": None,
            "replicas_to_drain": None,
            "note": NO_ARRIVAL_RATE,
        },
    }


async def test_an_unreachable_broker_or_database_is_one_line_and_exit_1(
    topology_settings: AdminSettings, results_db: str
) -> None:
    setup = SetUp(topology_settings, results_db)
    away = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    nowhere = f"http://guest:guest@127.0.0.1:{closed_port()}/"
    no_database = results_db.rsplit("/", 1)[0] + "/detfleet_no_such_db"
    for env, says in (
        ({"DETFLEET_AMQP_URL": away, "DETFLEET_MANAGEMENT_URL": nowhere}, "unreachable"),
        ({"DETFLEET_DATABASE_URL": no_database}, "does not exist"),
    ):
        code, out, err = await status(setup, "--json", **env)
        assert (code, out) == (1, ""), err
        [line] = err.splitlines()
        assert line.startswith("detfleet status: error: ")
        assert says in line
