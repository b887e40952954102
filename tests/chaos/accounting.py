"""The soak's accounting: what the producers had confirmed against the rows and DLQ entries that exist.

The promise under test (docs/reliability.md): a task the broker confirmed ends with exactly one row,
``ok``, ``failed`` (with exactly one DLQ entry) or ``shed`` (realtime only), whatever failed on the way.
The primary key makes a second row impossible, so the checks are: no confirmed task without a row, no row
for a task nobody published, every ``failed`` row has one DLQ entry carrying a reason and no task has two,
and nothing on the bulk lane was shed.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

# A kill this soon after a DLQ copy was made can land between its confirm and the row's record of it.
KILL_WINDOW = timedelta(seconds=2)


@dataclass
class Ledger:
    """What the producers did: every task id they submitted, and the lane of each one confirmed."""

    submitted: set[uuid.UUID] = field(default_factory=set)
    confirmed: dict[uuid.UUID, str] = field(default_factory=dict)
    unconfirmed: Counter[str] = field(default_factory=Counter)  # why a submitted frame was not confirmed
    bad_frames: set[uuid.UUID] = field(default_factory=set)  # published on purpose undecodable

    def submit(self, task_id: uuid.UUID, bad: bool) -> None:
        self.submitted.add(task_id)
        if bad:
            self.bad_frames.add(task_id)

    def confirm(self, task_id: uuid.UUID, lane: str) -> None:
        self.confirmed[task_id] = lane

    def refuse(self, why: str) -> None:
        self.unconfirmed[why] += 1


@dataclass(frozen=True)
class Row:
    task_id: uuid.UUID
    status: str
    lane: str | None
    redeliveries: int


@dataclass(frozen=True)
class DlqEntry:
    task_id: uuid.UUID | None
    reason: str | None
    failed_at: datetime | None = None


@dataclass(frozen=True)
class Unsure:
    """Where a second DLQ copy is allowed (docs/message-flow.md): a copy whose confirm a cut or a restart
    swallowed, or whose record did not commit (from the replicas' logs), and any copy made just before a
    replica was killed."""

    copies: frozenset[uuid.UUID] = frozenset()
    kills: tuple[datetime, ...] = ()

    def excuses(self, entries: list[DlqEntry]) -> bool:
        task_id = entries[0].task_id
        if task_id in self.copies:
            return True
        made = [e.failed_at for e in entries if e.failed_at is not None]
        return any(m <= kill <= m + KILL_WINDOW for m in made for kill in self.kills)


@dataclass(frozen=True)
class Account:
    """The verdict: ``passed`` when every list of offenders is empty."""

    confirmed: int
    confirmed_by_lane: dict[str, int]
    rows_by_status: dict[str, int]
    lost: list[uuid.UUID]  # confirmed, no row
    strangers: list[uuid.UUID]  # a row for a task id never submitted
    failed_without_dlq: list[uuid.UUID]
    shed_on_bulk: list[uuid.UUID]
    bad_frames_not_failed: list[uuid.UUID]  # an undecodable frame that ended ok
    dlq_without_reason: int
    dlq_entries: int
    duplicate_dlq_entries: int
    unexplained_duplicates: list[uuid.UUID]  # a second DLQ entry outside the windows the docs name
    redeliveries_absorbed: int
    events: int = 0  # result events read back from a queue bound to detfleet.results
    rows_without_event: list[uuid.UUID] = field(default_factory=list)
    repeated_events: int = 0  # a second event of a task: allowed (at least once), counted

    @property
    def passed(self) -> bool:
        return not (
            self.lost
            or self.strangers
            or self.failed_without_dlq
            or self.shed_on_bulk
            or self.bad_frames_not_failed
            or self.dlq_without_reason
            or self.unexplained_duplicates
            or self.rows_without_event
        )

    def problems(self) -> list[str]:
        found = {
            "confirmed tasks without a row": len(self.lost),
            "rows of tasks never published": len(self.strangers),
            "failed rows without a DLQ entry": len(self.failed_without_dlq),
            "bulk tasks shed": len(self.shed_on_bulk),
            "undecodable frames not failed": len(self.bad_frames_not_failed),
            "DLQ entries without x-detfleet-reason": self.dlq_without_reason,
            "second DLQ entries outside the documented windows": len(self.unexplained_duplicates),
            "rows without a result event": len(self.rows_without_event),
        }
        return [f"{name}: {count}" for name, count in found.items() if count]


def account(
    ledger: Ledger,
    rows: list[Row],
    dlq: list[DlqEntry],
    unsure: Unsure | None = None,
    events: list[uuid.UUID] | None = None,
) -> Account:
    """The verdict on a run; ``events`` (task ids of the result events read back) None: not checked."""
    by_id = {r.task_id: r for r in rows}
    in_dlq = Counter(e.task_id for e in dlq if e.task_id is not None)
    entries_of: dict[uuid.UUID, list[DlqEntry]] = {}
    for entry in dlq:
        if entry.task_id is not None:
            entries_of.setdefault(entry.task_id, []).append(entry)
    unsure = unsure or Unsure()
    lane_of = ledger.confirmed
    return Account(
        confirmed=len(lane_of),
        confirmed_by_lane=dict(Counter(lane_of.values())),
        rows_by_status=dict(Counter(r.status for r in rows)),
        lost=sorted(set(lane_of) - set(by_id)),
        strangers=sorted(set(by_id) - ledger.submitted),
        failed_without_dlq=sorted(r.task_id for r in rows if r.status == "failed" and not in_dlq[r.task_id]),
        shed_on_bulk=sorted(
            r.task_id for r in rows if r.status == "shed" and lane_of.get(r.task_id, r.lane) == "bulk"
        ),
        bad_frames_not_failed=sorted(
            t for t in ledger.bad_frames if t in by_id and by_id[t].status not in ("failed", "shed")
        ),
        dlq_without_reason=sum(1 for e in dlq if not e.reason),
        dlq_entries=len(dlq),
        duplicate_dlq_entries=sum(n - 1 for n in in_dlq.values()),
        unexplained_duplicates=sorted(
            t for t, entries in entries_of.items() if len(entries) > 1 and not unsure.excuses(entries)
        ),
        redeliveries_absorbed=sum(r.redeliveries for r in rows),
        events=len(events or ()),
        rows_without_event=sorted(set(by_id) - set(events)) if events is not None else [],
        repeated_events=len(events or ()) - len(set(events or ())),
    )
