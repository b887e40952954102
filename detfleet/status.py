"""``detfleet status``: the fleet at a glance, and how many replicas it needs.

It reads, and changes nothing: no message is taken from any queue.

- **Queues** from the management API: ready, unacked, consumers, in rate (publishes into the queue) and out
  rate (deliveries to consumers). Without the management API a passive declare over AMQP still gives ready
  and consumers per queue; the report says what is then missing.
- **Rows** from Postgres: rows written in the last minute by status; DLQ entries by reason (failed rows whose
  DLQ copy was confirmed and has not been replayed or purged since); the consumers that wrote rows in the
  window, with the model sha256 each ran, so a fleet half-way through a model roll-out shows.
- **Advice** (:mod:`detfleet.scale_advice`): replicas to keep up with the lanes' arrival rate, and to drain
  the work queues' backlog within ``--drain-within``, from the throughput the rows show per replica.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from detfleet.dlq_index import parse_duration
from detfleet.scale_advice import Advice, advise, per_replica_rate
from shared import db
from shared.broker.aio import Broker
from shared.errors import BrokerError, BrokerUnavailableError, DatabaseError
from shared.logs import configure_logging
from shared.management import Management, rate_of
from shared.settings import AdminSettings, GatewaySettings, load_settings, mask_url
from shared.topology import QUEUE_BULK, QUEUE_REALTIME, WORK_QUEUES, Topology, vhost_of

DEFAULT_WINDOW = "5m"
DEFAULT_DRAIN_WITHIN = "15m"
DEFAULT_WATCH_S = 5.0
LANE_QUEUES = (QUEUE_REALTIME, QUEUE_BULK)  # where tasks arrive; the other work queues are re-entries
STATUSES = ("ok", "failed", "shed")
# Who collects: this command, and the HTTP gateway's live page (each knows the broker, its API, the database).
FleetSettings = AdminSettings | GatewaySettings


@dataclass(frozen=True)
class QueueStatus:
    """One queue's figures; ``None`` where the source at hand cannot tell (or the queue is not declared)."""

    name: str
    ready: int | None
    unacked: int | None
    consumers: int | None
    in_rate: float | None
    out_rate: float | None


@dataclass(frozen=True)
class ConsumerSeen:
    consumer_id: str
    model_sha256: str | None
    rows: int


@dataclass
class Report:
    vhost: str
    management_api: bool
    queues: list[QueueStatus]
    rows_last_minute: dict[str, int]
    dlq_by_reason: dict[str, int]
    window_s: float
    consumers_seen: list[ConsumerSeen]
    advice: Advice
    missing: list[str] = field(default_factory=list)

    @property
    def models(self) -> list[str]:
        return sorted({c.model_sha256 or "(unknown)" for c in self.consumers_seen})

    def as_json(self) -> dict[str, Any]:
        return {
            "vhost": self.vhost,
            "management_api": self.management_api,
            "queues": [asdict(q) for q in self.queues],
            "rows_last_minute": self.rows_last_minute,
            "dlq_by_reason": self.dlq_by_reason,
            "window_s": self.window_s,
            "consumers_seen": [asdict(c) for c in self.consumers_seen],
            "models": self.models,
            "mixed_fleet": len(self.models) > 1,
            "advice": self.advice.as_json(),
            "missing": self.missing,
        }


# ---- the broker --------------------------------------------------------------------------------------------


def _from_management(name: str, found: dict[str, Any] | None) -> QueueStatus:
    if found is None:
        return QueueStatus(name, None, None, None, None, None)
    return QueueStatus(
        name,
        int(found.get("messages_ready", 0)),
        int(found.get("messages_unacknowledged", 0)),
        int(found.get("consumers", 0)),
        rate_of(found, "publish"),
        rate_of(found, "deliver_get"),
    )


async def queues_from_management(settings: FleetSettings, names: Sequence[str]) -> list[QueueStatus]:
    async with Management(settings.management_url) as api:
        by_name = {q["name"]: q for q in await api.queues(vhost_of(settings.amqp_url))}
    return [_from_management(name, by_name.get(name)) for name in names]


async def queues_from_amqp(settings: FleetSettings, names: Sequence[str]) -> list[QueueStatus]:
    """Ready and consumers by passive declare; a queue that is not declared shows as unknown."""
    broker = await Broker.connect(settings.amqp_url, "detfleet-status", robust=False)
    try:
        figures = []
        for name in names:
            try:
                ready, consumers = await broker.queue_counts(name)
            except BrokerError:
                figures.append(QueueStatus(name, None, None, None, None, None))
                continue
            figures.append(QueueStatus(name, ready, None, consumers, None, None))
        return figures
    finally:
        await broker.close()


async def broker_figures(settings: FleetSettings) -> tuple[list[QueueStatus], list[str], bool]:
    """The queues' figures, what could not be seen, and whether the management API answered (else AMQP)."""
    names = [q.name for q in Topology.from_settings(settings).queues]
    try:
        queues = await queues_from_management(settings, names)
        missing: list[str] = []
        via_management = True
    except BrokerError as error:
        queues = await queues_from_amqp(settings, names)
        via_management = False
        why = "unreachable" if isinstance(error, BrokerUnavailableError) else f"refused: {error}"
        missing = [
            f"management API {mask_url(settings.management_url)} {why}: unacked counts, in/out rates "
            "and the arrival rate are unknown; ready and consumers come from AMQP"
        ]
    absent = [q.name for q in queues if q.ready is None]
    if absent:
        missing.append(f"not declared: {', '.join(absent)} (run 'detfleet topology apply')")
    return queues, missing, via_management


# ---- the rows ----------------------------------------------------------------------------------------------

_ROWS_LAST_MINUTE = """
SELECT status, count(*)::int AS n FROM detfleet_results
WHERE completed_at >= now() - interval '1 minute' GROUP BY status
"""
# A failed row holds a DLQ copy from its confirm until a replay or purge takes the entry (both clear it).
_DLQ_BY_REASON = """
SELECT coalesce(reason, '(no reason recorded)') AS reason, count(*)::int AS n FROM detfleet_results
WHERE status = 'failed' AND dlq_confirmed_at IS NOT NULL GROUP BY 1 ORDER BY n DESC, reason
"""
_CONSUMERS_SEEN = """
SELECT consumer_id, model_sha256, count(*)::int AS n FROM detfleet_results
WHERE completed_at >= now() - $1::interval GROUP BY 1, 2 ORDER BY 1, 2
"""


async def row_figures(
    conn: asyncpg.Connection, window: timedelta
) -> tuple[dict[str, int], dict[str, int], list[ConsumerSeen]]:
    try:
        last_minute = {r["status"]: r["n"] for r in await conn.fetch(_ROWS_LAST_MINUTE)}
        dlq = {r["reason"]: r["n"] for r in await conn.fetch(_DLQ_BY_REASON)}
        seen = [
            ConsumerSeen(r["consumer_id"], r["model_sha256"], r["n"])
            for r in await conn.fetch(_CONSUMERS_SEEN, window)
        ]
    except asyncpg.UndefinedTableError as error:
        raise DatabaseError(f"{error}: run 'detfleet db migrate' first") from None
    except asyncpg.PostgresError as error:
        raise DatabaseError(f"reading the results: {error}") from None
    return {s: last_minute.get(s, 0) for s in STATUSES}, dlq, seen


# ---- the report --------------------------------------------------------------------------------------------


def advice_of(
    queues: Sequence[QueueStatus], seen: Sequence[ConsumerSeen], window_s: float, drain_within_s: float
) -> Advice:
    rows: dict[str, int] = {}
    for consumer in seen:
        rows[consumer.consumer_id] = rows.get(consumer.consumer_id, 0) + consumer.rows
    lanes = [q for q in queues if q.name in LANE_QUEUES]
    rates = [q.in_rate for q in lanes]
    arrival = None if not lanes or any(r is None for r in rates) else sum(r or 0.0 for r in rates)
    backlog = sum((q.ready or 0) + (q.unacked or 0) for q in queues if q.name in WORK_QUEUES)
    return advise(per_replica_rate(rows, window_s), arrival, backlog, drain_within_s)


async def collect(settings: FleetSettings, window: timedelta, drain_within: timedelta) -> Report:
    conn = await db.connect(settings.database_url)
    try:
        last_minute, dlq, seen = await row_figures(conn, window)
    finally:
        await conn.close()
    queues, missing, via_management = await broker_figures(settings)
    window_s, drain_s = window.total_seconds(), drain_within.total_seconds()
    return Report(
        vhost=vhost_of(settings.amqp_url),
        management_api=via_management,
        queues=queues,
        rows_last_minute=last_minute,
        dlq_by_reason=dlq,
        window_s=window_s,
        consumers_seen=seen,
        advice=advice_of(queues, seen, window_s, drain_s),
        missing=missing,
    )


# ---- showing it --------------------------------------------------------------------------------------------


def _cell(value: float | None, rate: bool = False) -> str:
    if value is None:
        return "?"
    return f"{value:.2f}/s" if rate else str(value)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    """A table whose first column reads left and the figures right."""
    table = Table(title=title)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _queues_table(report: Report) -> Table:
    rows = [
        [
            q.name,
            _cell(q.ready),
            _cell(q.unacked),
            _cell(q.consumers),
            _cell(q.in_rate, rate=True),
            _cell(q.out_rate, rate=True),
        ]
        for q in report.queues
    ]
    columns = ("queue", "ready", "unacked", "consumers", "in", "out")
    return _table(f"queues (vhost {report.vhost})", columns, rows)


def _rows_parts(report: Report) -> list[Table | Text]:
    """Rows of the last minute, DLQ reasons and consumers seen; a line instead of an empty table."""
    window = _minutes(report.window_s)
    parts: list[Table | Text] = [
        _table(
            "rows written in the last minute",
            ("", *STATUSES),
            [["rows", *(str(report.rows_last_minute[s]) for s in STATUSES)]],
        )
    ]
    total = sum(report.dlq_by_reason.values())
    dlq = [[reason, str(count)] for reason, count in report.dlq_by_reason.items()]
    parts.append(
        _table(f"DLQ entries by reason ({total})", ("reason", "entries"), dlq)
        if dlq
        else Text("DLQ: no entries")
    )
    seen = [[c.consumer_id, c.model_sha256 or "(unknown)", str(c.rows)] for c in report.consumers_seen]
    parts.append(
        _table(f"consumers seen in the last {window}", ("consumer", "model sha256", "rows"), seen)
        if seen
        else Text(f"no rows from any consumer in the last {window}")
    )
    if len(report.models) > 1:
        parts.append(Text(f"mixed fleet: {len(report.models)} models running", style="bold yellow"))
    return parts


def render(report: Report) -> Group:
    """The whole report as rich renderables: what the tables and ``--watch`` show."""
    missing = [Text(f"missing: {m}", style="yellow") for m in report.missing]
    return Group(_queues_table(report), *_rows_parts(report), _advice_text(report.advice), *missing)


def _advice_text(advice: Advice) -> Text:
    if advice.note is not None:
        return Text(f"scale advice: {advice.note}")
    return Text(
        f"scale advice: one replica settles {advice.per_replica_rate:.2f} tasks/s; "
        f"{advice.keep_up} replicas keep up with {advice.arrival_rate:.2f} arriving/s, "
        f"{advice.drain} drain the backlog of {advice.backlog} within {_minutes(advice.drain_within_s)}"
    )


# ---- the command -------------------------------------------------------------------------------------------


def _duration(text: str) -> timedelta:
    try:
        duration = parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if duration.total_seconds() <= 0:
        raise argparse.ArgumentTypeError(f"must be longer than zero, got {text!r}")
    return duration


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected seconds above zero, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detfleet status", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout instead of tables")
    parser.add_argument(
        "--watch",
        type=_seconds,
        nargs="?",
        const=DEFAULT_WATCH_S,
        metavar="S",
        help=f"refresh every S seconds (default {DEFAULT_WATCH_S:g}) until Ctrl-C",
    )
    parser.add_argument(
        "--drain-within",
        type=_duration,
        default=_duration(DEFAULT_DRAIN_WITHIN),
        metavar="DURATION",
        help=f"the backlog drain target of the scale advice (default {DEFAULT_DRAIN_WITHIN})",
    )
    parser.add_argument(
        "--window",
        type=_duration,
        default=_duration(DEFAULT_WINDOW),
        metavar="DURATION",
        help=f"how far back rows count for consumers seen and throughput (default {DEFAULT_WINDOW})",
    )
    return parser


async def _watch(settings: AdminSettings, args: argparse.Namespace) -> None:
    report = await collect(settings, args.window, args.drain_within)
    with Live(render(report), console=Console(), auto_refresh=False) as live:
        while True:
            await asyncio.sleep(args.watch)  # the refresh period the operator asked for
            live.update(render(await collect(settings, args.window, args.drain_within)), refresh=True)


async def _once(settings: AdminSettings, args: argparse.Namespace) -> None:
    report = await collect(settings, args.window, args.drain_within)
    if args.json:
        print(json.dumps(report.as_json(), sort_keys=True), flush=True)
    else:
        Console().print(render(report))


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json and args.watch is not None:
        parser.error("--watch redraws tables; it cannot be combined with --json")
    settings = load_settings(AdminSettings)
    configure_logging(settings.log_level, settings.log_json)
    try:
        asyncio.run((_watch if args.watch is not None else _once)(settings, args))
    except KeyboardInterrupt:  # how --watch ends
        return 0
    return 0
