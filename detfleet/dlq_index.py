"""The failed rows as the DLQ's index: filter them in Postgres without touching the broker.

Every DLQ entry has a ``failed`` row with the same task id and reason, written before the entry was
published. So what ``detfleet dlq`` selects (by reason, camera, site, age or id) is chosen here, fast and
with no effect on the broker; only the payloads are fetched from the DLQ. ``detfleet_dlq_ledger``
(migration 0003) records what the tool sent back or deleted.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from shared.errors import DatabaseError

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``2h``, ``7d``, ``1w``; anything else is a usage error the caller reports."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"expected a duration like 90s, 15m, 2h, 7d or 1w, got {text!r}")
    return timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])


@dataclass(frozen=True)
class Filters:
    """What to select. ``reason`` matches a part of the reason, case-insensitively; the rest exactly."""

    ids: tuple[uuid.UUID, ...] = ()
    reason: str | None = None
    camera: str | None = None
    site: str | None = None
    since: timedelta | None = None
    older_than: timedelta | None = None
    limit: int | None = None

    @property
    def is_empty(self) -> bool:
        return not (self.ids or self.reason or self.camera or self.site or self.since or self.older_than)

    def describe(self) -> dict[str, Any]:
        """The filter as the audit log records it."""
        shown: dict[str, Any] = {
            "ids": [str(i) for i in self.ids] or None,
            "reason": self.reason,
            "camera": self.camera,
            "site": self.site,
            "since": None if self.since is None else f"{self.since.total_seconds():g}s",
            "older_than": None if self.older_than is None else f"{self.older_than.total_seconds():g}s",
            "limit": self.limit,
        }
        return {k: v for k, v in shown.items() if v is not None}


@dataclass(frozen=True)
class FailedTask:
    """A failed row with what the ledger knows of its DLQ entry."""

    task_id: uuid.UUID
    camera_id: str | None
    site: str | None
    lane: str | None
    reason: str | None
    attempt: int
    failed_at: datetime
    routing_key: str | None
    payload_bytes: int | None
    replays: int
    # parked: in the DLQ as far as detfleet knows; replayed: sent back (parked again if it failed again);
    # purged: deleted by ``detfleet dlq purge``.
    dlq_state: str
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "task_id": str(self.task_id),
            "camera_id": self.camera_id,
            "site": self.site,
            "lane": self.lane,
            "reason": self.reason,
            "attempt": self.attempt,
            "failed_at": self.failed_at.isoformat(),
            "routing_key": self.routing_key,
            "payload_bytes": self.payload_bytes,
            "replays": self.replays,
            "dlq_state": self.dlq_state,
        }


# The latest ledger action per task decides its state; routing key and size come from the row when the
# consumer filled them, else from what the tool saw, else (routing key) from lane, site and camera.
_SELECT = """
SELECT r.task_id, r.camera_id, r.site, r.lane, r.reason, r.attempt, r.completed_at,
       coalesce(r.original_routing_key, l.routing_key,
                CASE WHEN r.lane IS NOT NULL AND r.site IS NOT NULL AND r.camera_id IS NOT NULL
                     THEN r.lane || '.' || r.site || '.' || r.camera_id END) AS routing_key,
       coalesce(r.payload_bytes, l.payload_bytes) AS payload_bytes,
       coalesce(n.replays, 0) AS replays,
       coalesce(l.action, 'parked') AS dlq_state
FROM detfleet_results r
LEFT JOIN LATERAL (
    SELECT action, routing_key, payload_bytes FROM detfleet_dlq_ledger
    WHERE task_id = r.task_id ORDER BY at DESC, action DESC LIMIT 1
) l ON true
LEFT JOIN LATERAL (
    SELECT count(*)::int AS replays FROM detfleet_dlq_ledger WHERE task_id = r.task_id AND action = 'replayed'
) n ON true
WHERE r.status = 'failed'
"""


def _where(filters: Filters, exclude_purged: bool) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    values: list[Any] = []

    def add(sql: str, value: Any) -> None:
        values.append(value)
        clauses.append(sql.format(f"${len(values)}"))

    if filters.ids:
        add("r.task_id = ANY({}::uuid[])", list(filters.ids))
    if filters.reason:
        add("r.reason ILIKE '%' || {} || '%'", filters.reason.replace("%", r"\%").replace("_", r"\_"))
    if filters.camera:
        add("r.camera_id = {}", filters.camera)
    if filters.site:
        add("r.site = {}", filters.site)
    if filters.since is not None:
        add("r.completed_at >= now() - {}::interval", filters.since)
    if filters.older_than is not None:
        add("r.completed_at < now() - {}::interval", filters.older_than)
    if exclude_purged:
        clauses.append("coalesce(l.action, 'parked') <> 'purged'")
    sql = "".join(f" AND {c}" for c in clauses) + " ORDER BY r.completed_at DESC, r.task_id"
    if filters.limit is not None:
        values.append(filters.limit)
        sql += f" LIMIT ${len(values)}"
    return sql, values


async def failed_tasks(
    conn: asyncpg.Connection, filters: Filters, exclude_purged: bool = False
) -> list[FailedTask]:
    """The failed rows the filters select, newest first."""
    where, values = _where(filters, exclude_purged)
    try:
        records = await conn.fetch(_SELECT + where, *values)
    except asyncpg.UndefinedTableError as error:
        raise DatabaseError(f"{error}: run 'detfleet db migrate' first") from None
    return [
        FailedTask(
            task_id=r["task_id"],
            camera_id=r["camera_id"],
            site=r["site"],
            lane=r["lane"],
            reason=r["reason"],
            attempt=r["attempt"],
            failed_at=r["completed_at"],
            routing_key=r["routing_key"],
            payload_bytes=r["payload_bytes"],
            replays=r["replays"],
            dlq_state=r["dlq_state"],
        )
        for r in records
    ]


async def row_of(conn: asyncpg.Connection, task_id: uuid.UUID) -> dict[str, Any] | None:
    """The result row of ``task_id``, whatever its status (``show`` prints it)."""
    record = await conn.fetchrow("SELECT * FROM detfleet_results WHERE task_id = $1", task_id)
    return None if record is None else dict(record)


_NO_COPY_PARKED = "UPDATE detfleet_results SET dlq_confirmed_at = NULL WHERE task_id = $1"


async def was_sent(conn: asyncpg.Connection, task_id: uuid.UUID, replay: int) -> bool:
    """True when a replay run already sent copy number ``replay`` of this task (and the broker confirmed)."""
    found = await conn.fetchval(
        "SELECT 1 FROM detfleet_dlq_ledger WHERE task_id = $1 AND replay = $2 AND action = 'replayed'",
        task_id,
        replay,
    )
    return found is not None


async def record(
    conn: asyncpg.Connection,
    task_id: uuid.UUID,
    replay: int,
    action: str,
    routing_key: str | None,
    payload_bytes: int | None,
) -> None:
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO detfleet_dlq_ledger (task_id, replay, action, routing_key, payload_bytes)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            task_id,
            replay,
            action,
            routing_key,
            payload_bytes,
        )
        # The entry leaves the DLQ: the row holds no confirmed copy any more, so a replay that fails again
        # gets a new one from the consumer (docs/message-flow.md).
        await conn.execute(_NO_COPY_PARKED, task_id)


def by_reason(tasks: Sequence[FailedTask]) -> dict[str, int]:
    """How many tasks per reason, most first: what a dry run prints."""
    counts: dict[str, int] = {}
    for task in tasks:
        key = task.reason or "(no reason recorded)"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
