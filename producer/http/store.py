"""What the HTTP gateway reads and writes in Postgres: result rows (read) and the tasks it accepted.

Accepted ids live in ``detfleet_gateway_tasks`` (migration 0005), not in memory, so that every replica and a
restarted gateway tell "accepted, no row yet" from "unknown".
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg

from shared.errors import DatabaseError
from shared.settings import Lane, mask_url

# A request never waits longer than this for the database; the pool connects lazily.
QUERY_TIMEOUT_S = 5.0

_RESULT = """
SELECT task_id, status, reason, site, camera_id, lane, captured_at, received_at, completed_at, attempt,
       redeliveries, consumer_id, model_name, model_sha256, provider, queue_wait_ms, decode_ms, inference_ms,
       sink_ms, end_to_end_ms, image_width, image_height, detections, trace_id
FROM detfleet_results WHERE task_id = $1
"""
_ACCEPTED = (
    "SELECT task_id, site, camera_id, lane, accepted_at FROM detfleet_gateway_tasks WHERE task_id = $1"
)
_REMEMBER = """
INSERT INTO detfleet_gateway_tasks (task_id, site, camera_id, lane, gateway) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (task_id) DO NOTHING
"""
_TIMINGS = ("queue_wait_ms", "decode_ms", "inference_ms", "sink_ms", "end_to_end_ms")


def _result_of(record: asyncpg.Record) -> dict[str, Any]:
    row = dict(record)
    detections = row.pop("detections")
    timings = {name: row.pop(name) for name in _TIMINGS}
    return {
        **row,
        "detections": json.loads(detections) if isinstance(detections, str) else detections,
        "timings": timings,
    }


class Store:
    """A small lazily connecting pool; every failure is a :class:`DatabaseError` (the routes answer 503)."""

    def __init__(self, url: str, gateway: str) -> None:
        self._url = url
        self._gateway = gateway
        self._pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        # min_size 0: the gateway starts while the database is away and /readyz says so.
        self._pool = await asyncpg.create_pool(self._url, min_size=0, max_size=8, timeout=QUERY_TIMEOUT_S)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def _fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        if self._pool is None:
            raise DatabaseError("the gateway's database pool is not started")
        try:
            record: asyncpg.Record | None = await self._pool.fetchrow(query, *args, timeout=QUERY_TIMEOUT_S)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            raise DatabaseError(f"{mask_url(self._url)}: {error}") from error
        return record

    async def ping(self) -> None:
        await self._fetchrow("SELECT 1")

    async def result(self, task_id: uuid.UUID) -> dict[str, Any] | None:
        record = await self._fetchrow(_RESULT, task_id)
        return None if record is None else _result_of(record)

    async def accepted(self, task_id: uuid.UUID) -> dict[str, Any] | None:
        record = await self._fetchrow(_ACCEPTED, task_id)
        return None if record is None else dict(record)

    async def remember(self, task_id: uuid.UUID, site: str, camera: str, lane: Lane) -> None:
        await self._fetchrow(_REMEMBER, task_id, site, camera, lane, self._gateway)
