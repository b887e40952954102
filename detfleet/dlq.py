"""``detfleet dlq``: failed tasks and their dead-letter entries, for ops.

The failed rows in Postgres are the index (``list`` reads only them: fast, filterable, nothing happens on
the broker); the DLQ holds the payloads, which ``show``, ``replay``, ``purge`` and ``export`` fetch in one
pass over it (see :mod:`detfleet.dlq_broker` for how a pass leaves the entries it does not take).

Replay sends each selected entry back to ``detfleet.frames`` with its original routing key (or another
lane's), the dead-letter headers removed, the attempt count reset and ``x-detfleet-replays`` one higher;
once the broker confirmed it, records it in ``detfleet_dlq_ledger``, and only then acks the entry. A run
that was interrupted, or a second copy of an entry, finds the ledger row and the entry is removed without
sending it again. Ctrl-C stops a replay between two entries. Every replay and purge appends one line to the
audit log (``DETFLEET_AUDIT_LOG``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from detfleet import audit
from detfleet.dlq_broker import Parked, Verdict, one_pass
from detfleet.dlq_index import (
    FailedTask,
    Filters,
    by_reason,
    failed_tasks,
    parse_duration,
    record,
    row_of,
    was_sent,
)
from shared import db
from shared.broker.aio import Broker
from shared.errors import DetfleetError
from shared.logs import configure_logging
from shared.schema import H_DEADLINE, H_REPLAYS, LANES, Envelope, replay_copy
from shared.settings import AdminSettings, QueueType, load_settings
from shared.topology import EXCHANGE_FRAMES, QUEUE_DLQ

DEFAULT_MAX_REPLAYS = 3
EXIT_INTERRUPTED = 130


def _out(text: str = "") -> None:
    print(text, flush=True)


# ---- list ------------------------------------------------------------------------------------------------


def _list_table(tasks: Sequence[FailedTask]) -> Table:
    table = Table(title=f"failed tasks: {len(tasks)} shown (newest first)")
    for column in (
        "task id",
        "camera",
        "site",
        "reason",
        "attempts",
        "failed at",
        "routing key",
        "bytes",
        "DLQ",
    ):
        table.add_column(column, overflow="fold")
    for t in tasks:
        table.add_row(
            str(t.task_id),
            t.camera_id or "?",
            t.site or "?",
            t.reason or "",
            str(t.attempt),
            t.failed_at.strftime("%Y-%m-%d %H:%M:%S"),
            t.routing_key or "?",
            "?" if t.payload_bytes is None else str(t.payload_bytes),
            t.dlq_state if not t.replays else f"{t.dlq_state} ({t.replays}x replayed)",
        )
    return table


async def list_tasks(settings: AdminSettings, filters: Filters) -> list[FailedTask]:
    conn = await db.connect(settings.database_url)
    try:
        return await failed_tasks(conn, filters)
    finally:
        await conn.close()


# ---- show and export ---------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return str(value)


def entry_json(envelope: Envelope) -> dict[str, Any]:
    return {
        "message_id": envelope.message_id,
        "routing_key": envelope.routing_key,
        "content_type": envelope.content_type,
        "app_id": envelope.app_id,
        "bytes": len(envelope.body),
        "headers": _plain(dict(envelope.headers)),
    }


async def fetch_payloads(
    broker: Broker, queue_type: QueueType, wanted: set[uuid.UUID]
) -> dict[uuid.UUID, Envelope]:
    """The DLQ entries of ``wanted`` task ids (the first copy of each), every entry left in place."""
    found: dict[uuid.UUID, Envelope] = {}

    async def visit(entry: Parked) -> Verdict:
        if entry.task_id in wanted and entry.task_id not in found:
            found[entry.task_id] = entry.delivery.envelope
        return Verdict.LEAVE

    await one_pass(broker, queue_type, visit, done=lambda: len(found) == len(wanted))
    return found


def _image_suffix(body: bytes) -> str:
    if body.startswith(b"\xff\xd8"):
        return ".jpg"
    return ".png" if body.startswith(b"\x89PNG") else ".bin"


def export_files(directory: Path, task: FailedTask, envelope: Envelope) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{task.task_id}{_image_suffix(envelope.body)}").write_bytes(envelope.body)
    sidecar = {"row": task.as_json(), "entry": entry_json(envelope)}
    (directory / f"{task.task_id}.json").write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")


# ---- replay ------------------------------------------------------------------------------------------------


def replay_envelope(envelope: Envelope, replays: int, to_lane: str | None) -> Envelope:
    """The copy to send back: clean, attempt 1, ``x-detfleet-replays`` one higher, maybe to another lane."""
    copy = replay_copy(envelope)
    headers = {**copy.headers, H_REPLAYS: replays + 1}
    key = copy.routing_key
    if to_lane is not None:
        key = f"{to_lane}.{key.split('.', 1)[1]}" if "." in key else key
        if to_lane == "bulk":
            headers.pop(H_DEADLINE, None)  # a bulk task has no deadline; keeping it would fail it at once
    return replace(copy, headers=headers, routing_key=key)


@dataclass
class ReplayReport:
    selected: int = 0
    sent: int = 0
    already_sent: int = 0  # an interrupted run had sent it, or a second copy of the entry
    refused: int = 0  # replayed max_replays times already
    not_in_dlq: int = 0
    interrupted: bool = False


@dataclass(frozen=True)
class ReplayOptions:
    max_sends: int | None = None
    rate: float | None = None
    to_lane: str | None = None
    max_replays: int = DEFAULT_MAX_REPLAYS
    force: bool = False


async def replay(
    broker: Broker,
    conn: asyncpg.Connection,
    queue_type: QueueType,
    tasks: Sequence[FailedTask],
    options: ReplayOptions,
    stop: asyncio.Event | None = None,
    progress: Progress | None = None,
) -> ReplayReport:
    """Send the DLQ entries of ``tasks`` back, each task once; see the module docstring."""
    wanted = {t.task_id for t in tasks}
    report = ReplayReport(selected=len(wanted))
    settled: set[uuid.UUID] = set()
    bar = progress.add_task("replaying", total=options.max_sends or len(wanted)) if progress else None

    def full() -> bool:
        return options.max_sends is not None and report.sent >= options.max_sends

    async def visit(entry: Parked) -> Verdict:
        if entry.task_id is None or entry.task_id not in wanted or full():
            return Verdict.LEAVE
        if entry.task_id in settled or await was_sent(conn, entry.task_id, entry.replays + 1):
            await entry.delivery.ack()
            settled.add(entry.task_id)
            report.already_sent += 1
            return Verdict.TAKEN
        if entry.replays >= options.max_replays and not options.force:
            report.refused += 1
            return Verdict.LEAVE
        copy = replay_envelope(entry.delivery.envelope, entry.replays, options.to_lane)
        await broker.publish(copy, EXCHANGE_FRAMES)
        await record(conn, entry.task_id, entry.replays + 1, "replayed", copy.routing_key, entry.size)
        await entry.delivery.ack()
        settled.add(entry.task_id)
        report.sent += 1
        if progress is not None and bar is not None:
            progress.advance(bar)
        if options.rate:
            await asyncio.sleep(1 / options.rate)  # pacing the sends, not waiting for anything
        return Verdict.TAKEN

    result = await one_pass(broker, queue_type, visit, done=lambda: full() or settled == wanted, stop=stop)
    report.interrupted = result.interrupted
    if not report.interrupted and not full():
        report.not_in_dlq = len(wanted - settled) - report.refused
    return report


# ---- purge -------------------------------------------------------------------------------------------------


@dataclass
class PurgeReport:
    removed: int = 0
    not_in_dlq: int = 0


async def purge_selected(
    broker: Broker, conn: asyncpg.Connection, queue_type: QueueType, tasks: Sequence[FailedTask]
) -> PurgeReport:
    """Delete the DLQ entries (every copy) of ``tasks``; the rows stay, marked purged in the ledger."""
    wanted = {t.task_id for t in tasks}
    removed: set[uuid.UUID] = set()
    report = PurgeReport()

    async def visit(entry: Parked) -> Verdict:
        if entry.task_id is None or entry.task_id not in wanted:
            return Verdict.LEAVE
        await record(
            conn, entry.task_id, entry.replays, "purged", entry.delivery.envelope.routing_key, entry.size
        )
        await entry.delivery.ack()
        removed.add(entry.task_id)
        report.removed += 1
        return Verdict.TAKEN

    await one_pass(broker, queue_type, visit)
    report.not_in_dlq = len(wanted - removed)
    return report


_MARK_ALL_PURGED = """
INSERT INTO detfleet_dlq_ledger (task_id, replay, action)
SELECT r.task_id,
       (SELECT count(*) FROM detfleet_dlq_ledger l WHERE l.task_id = r.task_id AND l.action = 'replayed'),
       'purged'
FROM detfleet_results r WHERE r.status = 'failed'
ON CONFLICT DO NOTHING
"""


async def purge_all(broker: Broker, conn: asyncpg.Connection) -> int:
    removed = await broker.purge(QUEUE_DLQ)
    async with conn.transaction():
        await conn.execute(_MARK_ALL_PURGED)
        await conn.execute("UPDATE detfleet_results SET dlq_confirmed_at = NULL WHERE status = 'failed'")
    return removed


# ---- the command -------------------------------------------------------------------------------------------


def _duration(text: str) -> Any:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_filters(parser: argparse.ArgumentParser, ids: bool = False, everything: bool = False) -> None:
    if ids:
        parser.add_argument(
            "--id", dest="ids", type=uuid.UUID, action="append", default=[], metavar="TASK_ID"
        )
    parser.add_argument("--reason", metavar="TEXT", help="reason contains TEXT (case-insensitive)")
    parser.add_argument("--camera", metavar="C")
    parser.add_argument("--site", metavar="S")
    parser.add_argument("--since", type=_duration, metavar="DURATION", help="failed within, e.g. 30m, 2h, 7d")
    parser.add_argument(
        "--older-than", type=_duration, metavar="DURATION", help="failed longer ago than this"
    )
    if everything:
        parser.add_argument("--all", action="store_true", help="every failed task")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detfleet dlq", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="failed tasks from Postgres (the broker is not touched)")
    _add_filters(listing)
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true", help="one JSON array on stdout instead of a table")
    show = sub.add_parser("show", help="a failed task's row and its DLQ entry")
    show.add_argument("task_id", type=uuid.UUID)
    show.add_argument("--save-image", type=Path, metavar="PATH", help="write the entry's body here")
    show.add_argument("--json", action="store_true")
    again = sub.add_parser("replay", help="send entries back to their lane once the cause is fixed")
    _add_filters(again, ids=True, everything=True)
    again.add_argument("--max", type=int, metavar="N", help="send at most N")
    again.add_argument("--rate", type=float, metavar="R", help="at most R sends a second")
    again.add_argument("--to-lane", choices=LANES, help="send to this lane instead of the original one")
    again.add_argument(
        "--max-replays",
        type=int,
        default=DEFAULT_MAX_REPLAYS,
        metavar="K",
        help=f"refuse tasks already replayed K times (default {DEFAULT_MAX_REPLAYS})",
    )
    again.add_argument("--force", action="store_true", help="replay even past --max-replays")
    again.add_argument("--dry-run", action="store_true", help="print what would go, by reason; send nothing")
    again.add_argument("--json", action="store_true")
    purge = sub.add_parser("purge", help="delete entries (the failed rows stay)")
    _add_filters(purge, ids=True, everything=True)
    purge.add_argument("--yes", action="store_true", help="really delete them")
    purge.add_argument("--json", action="store_true")
    export = sub.add_parser("export", help="write entries' images and a JSON sidecar each, leaving them")
    _add_filters(export, ids=True, everything=True)
    export.add_argument("--to", type=Path, required=True, metavar="DIR")
    export.add_argument("--json", action="store_true")
    return parser


def filters_of(args: argparse.Namespace) -> Filters:
    return Filters(
        ids=tuple(getattr(args, "ids", []) or ()),
        reason=args.reason,
        camera=args.camera,
        site=args.site,
        since=args.since,
        older_than=args.older_than,
        limit=getattr(args, "limit", None),
    )


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """Ctrl-C or SIGTERM ends a replay between two entries, never between a send and its record."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        yield
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


class Session:
    """The database connection and, when a command needs payloads, the broker connection."""

    def __init__(self, settings: AdminSettings) -> None:
        self.settings = settings
        self.conn: asyncpg.Connection | None = None
        self.broker: Broker | None = None

    async def __aenter__(self) -> Session:
        self.conn = await db.connect(self.settings.database_url)
        return self

    async def connect_broker(self) -> Broker:
        self.broker = await Broker.connect(self.settings.amqp_url, "detfleet-dlq", robust=False)
        return self.broker

    async def __aexit__(self, *exc: object) -> None:
        if self.broker is not None:
            await self.broker.close()
        if self.conn is not None:
            await self.conn.close()


def _print(report: dict[str, Any], as_json: bool, text: str) -> None:
    _out(json.dumps(report, sort_keys=True) if as_json else text)


async def _list(settings: AdminSettings, args: argparse.Namespace) -> int:
    tasks = await list_tasks(settings, filters_of(args))
    if args.json:
        _out(json.dumps([t.as_json() for t in tasks]))
    else:
        Console().print(_list_table(tasks))
    return 0


async def _show(settings: AdminSettings, args: argparse.Namespace) -> int:
    async with Session(settings) as session:
        assert session.conn is not None
        row = await row_of(session.conn, args.task_id)
        broker = await session.connect_broker()
        payload = (await fetch_payloads(broker, settings.queue_type, {args.task_id})).get(args.task_id)
    if row is None and payload is None:
        raise_missing(args.task_id)
    if payload is not None and args.save_image is not None:
        args.save_image.write_bytes(payload.body)
    shown = {"row": _plain(row), "entry": None if payload is None else entry_json(payload)}
    if args.json:
        _out(json.dumps(shown, sort_keys=True))
        return 0
    table = Table(title=f"task {args.task_id}", show_header=False)
    for key, value in (row or {}).items():
        if value is not None:
            table.add_row(key, str(_plain(value)))
    Console().print(table)
    if payload is None:
        _out("DLQ entry: not in the DLQ (replayed, purged, or past the DLQ's retention)")
    else:
        Console().print_json(json.dumps(entry_json(payload)))
        if args.save_image is not None:
            _out(f"saved {len(payload.body)} bytes to {args.save_image}")
    return 0


def raise_missing(task_id: uuid.UUID) -> None:
    raise DetfleetError(f"no row and no DLQ entry for task {task_id}")


def _require_selection(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.all and not filters_of(args).is_empty:
        parser.error("--all cannot be combined with filters")
    if not args.all and filters_of(args).is_empty:
        parser.error(f"{args.action} needs --id, --reason, --camera, --site, --since, --older-than or --all")


async def _replay(settings: AdminSettings, args: argparse.Namespace) -> int:
    filters = filters_of(args)
    if not args.dry_run:
        audit.ensure_writable(settings.audit_log)
    async with Session(settings) as session:
        assert session.conn is not None
        tasks = await failed_tasks(session.conn, filters, exclude_purged=True)
        if args.dry_run:
            over = sum(1 for t in tasks if t.replays >= args.max_replays)
            groups = by_reason(tasks)
            if args.json:
                _out(json.dumps({"would_replay": len(tasks), "by_reason": groups, "over_replay_limit": over}))
            else:
                _out(f"would replay {len(tasks)} tasks{f' (at most {args.max})' if args.max else ''}:")
                for reason, count in groups.items():
                    _out(f"  {count:>6}  {reason}")
                if over and not args.force:
                    _out(f"  {over} already replayed {args.max_replays} times would be refused (--force)")
            return 0
        broker = await session.connect_broker()
        options = ReplayOptions(args.max, args.rate, args.to_lane, args.max_replays, args.force)
        stop = asyncio.Event()
        with (
            _stop_on_signals(stop),
            Progress(
                console=Console(stderr=True), disable=not sys.stderr.isatty() or args.json, transient=True
            ) as progress,
        ):
            report = await replay(broker, session.conn, settings.queue_type, tasks, options, stop, progress)
    audit.append(settings.audit_log, "replay", filters.describe(), **asdict(report), to_lane=args.to_lane)
    _print(
        asdict(report),
        args.json,
        f"replayed {report.sent} of {report.selected} selected; {report.already_sent} already sent before, "
        f"{report.refused} refused (replayed {args.max_replays} times; --force), "
        f"{report.not_in_dlq} not in the DLQ"
        + ("; interrupted: run it again to resume" if report.interrupted else ""),
    )
    return EXIT_INTERRUPTED if report.interrupted else 0


async def _purge(settings: AdminSettings, args: argparse.Namespace) -> int:
    filters = filters_of(args)
    audit.ensure_writable(settings.audit_log)
    async with Session(settings) as session:
        assert session.conn is not None
        broker = await session.connect_broker()
        if args.all:
            removed, missing = await purge_all(broker, session.conn), 0
        else:
            tasks = await failed_tasks(session.conn, filters, exclude_purged=True)
            result = await purge_selected(broker, session.conn, settings.queue_type, tasks)
            removed, missing = result.removed, result.not_in_dlq
    audit.append(
        settings.audit_log, "purge", {"all": True} if args.all else filters.describe(), removed=removed
    )
    _print(
        {"removed": removed, "not_in_dlq": missing}, args.json, f"purged {removed} entries from {QUEUE_DLQ}"
    )
    return 0


async def _export(settings: AdminSettings, args: argparse.Namespace) -> int:
    async with Session(settings) as session:
        assert session.conn is not None
        tasks = await failed_tasks(
            session.conn, Filters() if args.all else filters_of(args), exclude_purged=True
        )
        broker = await session.connect_broker()
        payloads = await fetch_payloads(broker, settings.queue_type, {t.task_id for t in tasks})
    for task in tasks:
        if task.task_id in payloads:
            export_files(args.to, task, payloads[task.task_id])
    report = {"exported": len(payloads), "not_in_dlq": len(tasks) - len(payloads), "to": str(args.to)}
    _print(
        report,
        args.json,
        f"exported {len(payloads)} entries to {args.to} ({report['not_in_dlq']} not in the DLQ)",
    )
    return 0


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.action in ("replay", "purge", "export"):
        _require_selection(parser, args)
    if args.action == "purge" and not args.yes:
        parser.error("purge deletes entries: run it again with --yes (try 'replay --dry-run' to see them)")
    settings = load_settings(AdminSettings)
    configure_logging(settings.log_level, settings.log_json)
    run = {"list": _list, "show": _show, "replay": _replay, "purge": _purge, "export": _export}[args.action]
    return asyncio.run(run(settings, args))
