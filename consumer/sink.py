"""The Postgres sink: one transaction per batch, one row per task id, redeliveries absorbed.

Upsert rules (DESIGN.md section 4): a new task inserts its row; an ``ok`` row is never overwritten (a bad
message reusing a good task's id cannot erase it); a ``failed`` or ``shed`` row becomes ``ok`` when a replay
succeeds. Every conflicting write counts one absorbed redelivery on the row, and the write reports the
status and reason of each row it left as it was (the worker still owes a ``failed`` row its DLQ entry).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from typing import Any

import asyncpg

from shared.errors import DatabaseError
from shared.settings import mask_url

logger = logging.getLogger(__name__)


class SinkUnavailableError(DatabaseError):
    """The batch's rows were not written; nothing was committed."""


@dataclass(frozen=True)
class ResultRow:
    task_id: uuid.UUID
    camera_id: str | None
    site: str | None
    lane: str | None
    captured_at: datetime | None
    received_at: datetime
    completed_at: datetime
    status: str
    reason: str | None
    attempt: int
    consumer_id: str
    model_name: str | None
    model_sha256: str | None
    provider: str | None
    queue_wait_ms: float | None
    decode_ms: float | None
    inference_ms: float | None
    sink_ms: float | None
    end_to_end_ms: float | None
    image_width: int | None
    image_height: int | None
    detections: list[dict[str, Any]] | None
    trace_id: str | None
    redeliveries: int = 0


COLUMNS = tuple(f.name for f in fields(ResultRow))
_TYPES = {
    "task_id": "uuid",
    "captured_at": "timestamptz",
    "received_at": "timestamptz",
    "completed_at": "timestamptz",
    "attempt": "int4",
    "redeliveries": "int4",
    "image_width": "int4",
    "image_height": "int4",
    "detections": "jsonb",
    **{c: "float8" for c in COLUMNS if c.endswith("_ms")},
}
# One statement per batch: the rows travel as one array per column and unnest into a row set.
_UPSERT = f"""
INSERT INTO detfleet_results ({", ".join(COLUMNS)})
SELECT * FROM unnest({", ".join(f"${i}::{_TYPES.get(c, 'text')}[]" for i, c in enumerate(COLUMNS, 1))})
ON CONFLICT (task_id) DO UPDATE SET
    {", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS if c not in ("task_id", "redeliveries"))},
    redeliveries = detfleet_results.redeliveries + EXCLUDED.redeliveries + 1
WHERE detfleet_results.status <> 'ok' AND EXCLUDED.status = 'ok'
RETURNING task_id, (xmax <> 0) AS replaced
"""
_COUNT_REDELIVERIES = """
UPDATE detfleet_results AS r SET redeliveries = r.redeliveries + c.n
FROM unnest($1::uuid[], $2::int4[]) AS c(task_id, n) WHERE r.task_id = c.task_id
RETURNING r.task_id, r.status, r.reason
"""
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,  # seen on a pool release after a cut link
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)


@dataclass(frozen=True)
class StoredRow:
    """A row the write left as it was (an earlier delivery of the task wrote it)."""

    status: str
    reason: str | None


@dataclass(frozen=True)
class WriteReport:
    inserted: int
    replaced: int
    absorbed: int
    seconds: float
    kept: dict[uuid.UUID, StoredRow] = field(default_factory=dict)


def _columns(rows: Sequence[ResultRow]) -> list[list[Any]]:
    columns: list[list[Any]] = [[getattr(r, c) for r in rows] for c in COLUMNS]
    index = COLUMNS.index("detections")
    columns[index] = [None if d is None else json.dumps(d) for d in columns[index]]
    return columns


class Sink:
    """A small asyncpg pool writing result rows."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, url: str) -> Sink:
        try:
            pool = await asyncpg.create_pool(url, min_size=1, max_size=2, timeout=10, command_timeout=30)
        except _UNAVAILABLE as error:
            raise SinkUnavailableError(f"cannot reach {mask_url(url)}: {error!r}") from error
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    async def ping(self) -> bool:
        """True when Postgres answers a trivial query now."""
        try:
            await self._pool.fetchval("SELECT 1", timeout=5)
        except (*_UNAVAILABLE, asyncpg.PostgresError):
            return False
        return True

    async def write(self, rows: Sequence[ResultRow]) -> WriteReport:
        """Upsert ``rows`` in one transaction, or raise :class:`SinkUnavailableError` with nothing written."""
        started = time.perf_counter()
        unique = _one_per_task(rows)
        try:
            async with self._pool.acquire(timeout=10) as conn, conn.transaction():
                written = await conn.fetch(_UPSERT, *_columns(unique))
                taken = {w["task_id"] for w in written}
                kept = [r for r in unique if r.task_id not in taken]  # an ok row stays as it is
                stored = []
                if kept:
                    stored = await conn.fetch(
                        _COUNT_REDELIVERIES, [r.task_id for r in kept], [r.redeliveries + 1 for r in kept]
                    )
        except (*_UNAVAILABLE, asyncpg.PostgresError) as error:
            raise SinkUnavailableError(f"writing {len(rows)} rows failed: {error!r}") from error
        replaced = sum(1 for w in written if w["replaced"])
        absorbed = len(rows) - len(written) + replaced
        return WriteReport(
            len(written) - replaced,
            replaced,
            absorbed,
            time.perf_counter() - started,
            {s["task_id"]: StoredRow(s["status"], s["reason"]) for s in stored},
        )

    async def fetch_rows(self, task_ids: Sequence[uuid.UUID] | None = None) -> list[dict[str, Any]]:
        """Rows as dicts (tests, demo and tools)."""
        query = "SELECT * FROM detfleet_results"
        args: list[Any] = []
        if task_ids is not None:
            query += " WHERE task_id = ANY($1::uuid[])"
            args.append(list(task_ids))
        records = await self._pool.fetch(query, *args)
        return [dict(r) for r in records]


def _one_per_task(rows: Sequence[ResultRow]) -> list[ResultRow]:
    """One row per task id within a batch, ``ok`` preferred; the other deliveries count as redeliveries."""
    chosen: dict[uuid.UUID, ResultRow] = {}
    for row in rows:
        previous = chosen.get(row.task_id)
        if previous is None:
            chosen[row.task_id] = row
            continue
        better = row if previous.status != "ok" and row.status == "ok" else previous
        chosen[row.task_id] = replace(better, redeliveries=previous.redeliveries + 1)
    return list(chosen.values())
