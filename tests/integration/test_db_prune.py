"""`detfleet db prune`: deletes rows older than the cut-off, of one status if asked, in batches."""

from __future__ import annotations

import uuid
from datetime import timedelta

import asyncpg

from shared import db

AGES_AND_STATUSES = [(40, "ok"), (40, "ok"), (40, "failed"), (40, "shed"), (1, "ok"), (1, "failed")]


async def insert_rows(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for days, status in AGES_AND_STATUSES:
            await conn.execute(
                "INSERT INTO detfleet_results (task_id, received_at, completed_at, status, consumer_id)"
                " VALUES ($1, now(), now() - $2::interval, $3, 't')",
                uuid.uuid4(),
                timedelta(days=days),
                status,
            )
    finally:
        await conn.close()


async def remaining(url: str) -> list[tuple[int, str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT extract(day FROM now() - completed_at)::int AS days, status FROM detfleet_results"
        )
        return sorted((r["days"], r["status"]) for r in rows)
    finally:
        await conn.close()


async def test_prune_deletes_only_old_rows_of_the_status_asked_for(results_db: str) -> None:
    await insert_rows(results_db)

    assert await db.prune(results_db, timedelta(days=30), "ok", batch=1) == 2
    assert await remaining(results_db) == [(1, "failed"), (1, "ok"), (40, "failed"), (40, "shed")]

    assert await db.prune(results_db, timedelta(days=30)) == 2
    assert await remaining(results_db) == [(1, "failed"), (1, "ok")]


async def test_prune_deletes_old_gateway_acceptances_too(results_db: str) -> None:
    conn = await asyncpg.connect(results_db)
    try:
        for days in (40, 40, 1):
            await conn.execute(
                "INSERT INTO detfleet_gateway_tasks (task_id, site, camera_id, lane, accepted_at)"
                " VALUES ($1, 's', 'c', 'bulk', now() - $2::interval)",
                uuid.uuid4(),
                timedelta(days=days),
            )
        assert await db.prune_accepted(results_db, timedelta(days=30), batch=1) == 2
        assert await conn.fetchval("SELECT count(*) FROM detfleet_gateway_tasks") == 1
    finally:
        await conn.close()
