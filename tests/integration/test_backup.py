"""Backup and restore of results with pg_dump and pg_restore, the commands docs/deployment.md gives."""

from __future__ import annotations

import subprocess
from pathlib import Path

import asyncpg
import pytest

from shared import db

pytestmark = pytest.mark.integration

ROWS = 50


def run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


async def results(url: str) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT * FROM detfleet_results ORDER BY task_id")
        return [tuple(r.values()) for r in rows]
    finally:
        await conn.close()


async def test_results_survive_a_dump_and_a_restore_into_a_new_database(
    results_db: str, database_url: str, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(results_db)
    try:
        await conn.execute(
            "INSERT INTO detfleet_results (task_id, camera_id, lane, received_at, completed_at, status,"
            " consumer_id, detections) SELECT gen_random_uuid(), 'cam-' || n, 'bulk', now(), now(), 'ok',"
            " 'backup', jsonb_build_array(jsonb_build_object('label', 'part', 'score', n / 100.0))"
            " FROM generate_series(1, $1) AS n",
            ROWS,
        )
    finally:
        await conn.close()
    dump = tmp_path / "detfleet.dump"
    run("pg_dump", "--format=custom", "--file", str(dump), results_db)

    restored = database_url.rsplit("/", 1)[0] + "/" + db.database_name(database_url) + "_restored"
    await db.ensure_database(restored)
    try:
        run("pg_restore", "--exit-on-error", "--no-owner", "--dbname", restored, str(dump))
        assert len(before := await results(results_db)) == ROWS
        assert await results(restored) == before
        assert await db.migrate(restored) == []  # the schema version came along: nothing to apply
        conn = await asyncpg.connect(restored)
        try:
            grant = "SELECT has_table_privilege('detfleet_writer', 'detfleet_results', 'INSERT')"
            assert await conn.fetchval(grant) is True
        finally:
            await conn.close()
    finally:
        await db.drop_database(restored)
