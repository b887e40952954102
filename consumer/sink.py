"""The Postgres sink: one transaction per batch, one row per task id, redeliveries absorbed.

Upsert rules (docs/message-flow.md): a new task inserts its row; an ``ok`` row is never overwritten (a bad
message reusing a good task's id cannot erase it); a ``failed`` or ``shed`` row becomes ``ok`` when a replay
succeeds. Every conflicting write counts one absorbed redelivery on the row. Before settling, the consumer
reads what the sink holds for the batch's task ids (:meth:`Sink.stored`), and after a DLQ copy is
confirmed it records that on the row (:meth:`Sink.record_dead_lettered`). The attempts table marks
redelivered tasks in progress (:meth:`Sink.mark_started`), the crash-loop guard.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from typing import Any

import asyncpg

from consumer.outcomes import Stored
from shared.errors import DatabaseError
from shared.settings import mask_url

logger = logging.getLogger(__name__)


class SinkUnavailableError(DatabaseError):
    """The batch's rows were not written; nothing was committed."""


@dataclass(frozen=True)
class ResultRow:
    task_id: uuid.UUID
    received_at: datetime
    completed_at: datetime
    status: str
    consumer_id: str
    reason: str | None = None
    camera_id: str | None = None
    site: str | None = None
    lane: str | None = None
    captured_at: datetime | None = None
    attempt: int = 1
    model_name: str | None = None
    model_sha256: str | None = None
    provider: str | None = None
    queue_wait_ms: float | None = None
    decode_ms: float | None = None
    inference_ms: float | None = None
    sink_ms: float | None = None
    end_to_end_ms: float | None = None
    image_width: int | None = None
    image_height: int | None = None
    detections: list[dict[str, Any]] | None = None
    trace_id: str | None = None
    producer: str | None = None
    original_routing_key: str | None = None  # failed rows: where the DLQ copy goes back to on replay
    payload_bytes: int | None = None  # failed rows: the size of the parked frame
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
    "payload_bytes": "int4",
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
"""
_STORED = """
SELECT task_id, status, reason, dlq_confirmed_at IS NOT NULL AS dead_lettered
FROM detfleet_results WHERE task_id = ANY($1::uuid[])
"""
_FINISHED = "DELETE FROM detfleet_attempts WHERE task_id = ANY($1::uuid[])"
_MARK_STARTED = """
INSERT INTO detfleet_attempts (task_id, starts, last_consumer_id) VALUES ($1, 1, $2)
ON CONFLICT (task_id) DO UPDATE SET
    starts = detfleet_attempts.starts + 1,
    last_started_at = now(),
    last_consumer_id = EXCLUDED.last_consumer_id
RETURNING starts - 1
"""
_RECORD_DEAD_LETTERED = """
UPDATE detfleet_results SET dlq_confirmed_at = now()
WHERE task_id = ANY($1::uuid[]) AND status = 'failed' AND dlq_confirmed_at IS NULL
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


_KEPT = "SELECT * FROM detfleet_results WHERE task_id = ANY($1::uuid[])"


@dataclass(frozen=True)
class WriteReport:
    inserted: int
    replaced: int
    absorbed: int
    seconds: float
    # Each written task's row as it stands after the commit (ours, or the one that stayed): its result event.
    committed: dict[uuid.UUID, Mapping[str, Any]] = field(default_factory=dict)


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

    async def stored(self, task_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Stored]:
        """What the sink holds for each of ``task_ids`` that has a row."""
        try:
            records = await self._pool.fetch(_STORED, list(task_ids), timeout=10)
        except (*_UNAVAILABLE, asyncpg.PostgresError) as error:
            raise SinkUnavailableError(f"reading {len(task_ids)} rows failed: {error!r}") from error
        return {r["task_id"]: Stored(r["status"], r["reason"], r["dead_lettered"]) for r in records}

    async def mark_started(self, task_id: uuid.UUID, consumer_id: str) -> int:
        """Mark a task in progress; returns how many earlier starts of it never finished."""
        try:
            unfinished: int = await self._pool.fetchval(_MARK_STARTED, task_id, consumer_id, timeout=10)
        except (*_UNAVAILABLE, asyncpg.PostgresError) as error:
            raise SinkUnavailableError(f"marking {task_id} started failed: {error!r}") from error
        return unfinished

    async def write(self, rows: Sequence[ResultRow], finished: Sequence[uuid.UUID] = ()) -> WriteReport:
        """Upsert ``rows`` and clear the in-progress marks of ``finished`` in one transaction, or raise
        :class:`SinkUnavailableError` with nothing written."""
        started = time.perf_counter()
        unique = _one_per_task(rows)
        try:
            async with self._pool.acquire(timeout=10) as conn, conn.transaction():
                written = await conn.fetch(_UPSERT, *_columns(unique)) if unique else []
                taken = {w["task_id"] for w in written}
                kept = [r for r in unique if r.task_id not in taken]  # an ok row stays as it is
                stayed: list[asyncpg.Record] = []
                if kept:
                    await conn.execute(
                        _COUNT_REDELIVERIES, [r.task_id for r in kept], [r.redeliveries + 1 for r in kept]
                    )
                    stayed = await conn.fetch(_KEPT, [r.task_id for r in kept])
                if finished:
                    await conn.execute(_FINISHED, list(finished))
        except (*_UNAVAILABLE, asyncpg.PostgresError) as error:
            raise SinkUnavailableError(f"writing {len(rows)} rows failed: {error!r}") from error
        replaced = sum(1 for w in written if w["replaced"])
        absorbed = len(rows) - len(written) + replaced
        committed: dict[uuid.UUID, Mapping[str, Any]] = {r.task_id: row_mapping(r) for r in unique}
        committed.update((r["task_id"], dict(r)) for r in stayed)
        elapsed = time.perf_counter() - started
        return WriteReport(len(written) - replaced, replaced, absorbed, elapsed, committed)

    async def record_dead_lettered(self, task_ids: Sequence[uuid.UUID]) -> None:
        """Note on each failed row that its DLQ copy was confirmed."""
        try:
            await self._pool.execute(_RECORD_DEAD_LETTERED, list(task_ids), timeout=10)
        except (*_UNAVAILABLE, asyncpg.PostgresError) as error:
            raise SinkUnavailableError(f"recording {len(task_ids)} DLQ copies failed: {error!r}") from error

    async def fetch_rows(self, task_ids: Sequence[uuid.UUID] | None = None) -> list[dict[str, Any]]:
        """Rows as dicts (tests, demo and tools)."""
        query = "SELECT * FROM detfleet_results"
        args: list[Any] = []
        if task_ids is not None:
            query += " WHERE task_id = ANY($1::uuid[])"
            args.append(list(task_ids))
        records = await self._pool.fetch(query, *args)
        return [dict(r) for r in records]


def row_mapping(row: ResultRow) -> dict[str, Any]:
    """A row as the column mapping a ``detfleet_results`` record gives."""
    return {column: getattr(row, column) for column in COLUMNS}


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
