"""What the HTTP gateway reads and writes in Postgres: result rows (read) and the tasks it accepted.

Accepted ids live in ``detfleet_gateway_tasks`` (migration 0005), not in memory, so that every replica and a
restarted gateway tell "accepted, no row yet" from "unknown".
"""

from __future__ import annotations

import asyncio
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
# Every acceptance waiting at the moment goes in one statement: under load one round trip serves many POSTs.
_REMEMBER = """
INSERT INTO detfleet_gateway_tasks (task_id, site, camera_id, lane, gateway)
SELECT task_id, site, camera_id, lane, $5 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[])
    AS accepted (task_id, site, camera_id, lane)
ON CONFLICT (task_id) DO NOTHING
"""
_Accepted = tuple[uuid.UUID, str, str, str]
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
        self._waiting: list[tuple[_Accepted, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # min_size 0: the gateway starts while the database is away and /readyz says so.
        self._pool = await asyncpg.create_pool(self._url, min_size=0, max_size=8, timeout=QUERY_TIMEOUT_S)

    async def close(self) -> None:
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
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
        """Record an accepted task; returns once it is written (batched with those accepted meanwhile)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A caller that went away (client disconnected) leaves its outcome unread: mark it seen.
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._waiting.append(((task_id, site, camera, lane), done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_waiting())
        await asyncio.shield(done)

    async def _write_waiting(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            columns = [list(column) for column in zip(*(accepted for accepted, _ in batch), strict=True)]
            try:
                await self._fetchrow(_REMEMBER, *columns, self._gateway)
            except DatabaseError as error:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(error)
                continue
            for _, done in batch:
                if not done.done():
                    done.set_result(None)
