"""``detfleet results``: result rows from Postgres, live result events, and the webhook forwarder.

- ``detfleet results [--camera C] [--site S] [--status S] [--since D] [--limit N] [--json]`` reads rows,
  newest first: a table, or one JSON line per row in the result event schema (docs/results.md).
- ``--follow`` binds a temporary queue (server-named, gone with the connection) to ``detfleet.results``
  with the routing key the filters make and prints each event as it arrives, until Ctrl-C or SIGTERM (exit
  0) or, with ``--limit N``, N events. Once subscribed it says so on stderr: events from then on are shown.
- ``detfleet results forward --webhook URL`` POSTs events to an endpoint (:mod:`detfleet.webhook`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from rich.console import Console
from rich.table import Table

from detfleet.dlq_index import parse_duration
from detfleet.webhook import WebhookOptions, forward
from shared import db
from shared.broker.aio import Broker, Delivery
from shared.errors import (
    BrokerError,
    BrokerUnavailableError,
    DatabaseError,
    SettingsError,
    TaskValidationError,
)
from shared.events import STATUSES, ResultEvent, binding_key
from shared.logs import configure_logging
from shared.schema import check_name
from shared.settings import SubscriberSettings, load_settings, mask_url
from shared.topology import EXCHANGE_RESULTS, parked_queue, webhook_queue

logger = logging.getLogger(__name__)

DEFAULT_LIMIT = 50
DEFAULT_WEBHOOK_NAME = "default"
SECRET_VARIABLE = "DETFLEET_WEBHOOK_SECRET"
SUBSCRIBED = "subscribed"  # the first word of the stderr line --follow prints once its queue is bound


def _out(text: str) -> None:
    print(text, flush=True)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---- rows --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowFilters:
    camera: str | None = None
    site: str | None = None
    status: str | None = None
    since: timedelta | None = None
    limit: int = DEFAULT_LIMIT


_SELECT = """
SELECT * FROM detfleet_results
WHERE ($1::text IS NULL OR camera_id = $1)
  AND ($2::text IS NULL OR site = $2)
  AND ($3::text IS NULL OR status = $3)
  AND ($4::interval IS NULL OR completed_at >= now() - $4::interval)
ORDER BY completed_at DESC, task_id
LIMIT $5
"""


async def read_rows(database_url: str, filters: RowFilters) -> list[ResultEvent]:
    """The matching rows, newest first, as events (the same fields a subscriber gets)."""
    conn = await db.connect(database_url)
    try:
        records = await conn.fetch(
            _SELECT, filters.camera, filters.site, filters.status, filters.since, filters.limit
        )
    except asyncpg.UndefinedTableError as error:
        raise DatabaseError(
            f"{db.database_name(database_url)} has no results table: run detfleet db migrate"
        ) from error
    except asyncpg.PostgresError as error:
        raise DatabaseError(f"reading results failed: {error}") from error
    finally:
        await conn.close()
    return [ResultEvent.from_row(dict(record)) for record in records]


def detections_summary(event: ResultEvent) -> str:
    """``2 scratch, 1 part``: how many of each label, most first."""
    if not event.detections:
        return "" if event.detections is None else "none"
    labels = Counter(str(d.get("label", d.get("class_id", "?"))) for d in event.detections)
    return ", ".join(f"{count} {label}" for label, count in labels.most_common())


def _cells(event: ResultEvent) -> list[str]:
    return [
        event.completed_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
        event.status,
        event.site or "?",
        event.camera_id or "?",
        event.lane or "?",
        detections_summary(event),
        "" if event.end_to_end_ms is None else f"{event.end_to_end_ms:.0f}",
        str(event.task_id),
        event.reason or "",
    ]


COLUMNS = ("completed at", "status", "site", "camera", "lane", "detections", "e2e ms", "task id", "reason")


def rows_table(events: Sequence[ResultEvent]) -> Table:
    table = Table(title=f"results: {len(events)} shown (newest first)")
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for event in events:
        table.add_row(*_cells(event))
    return table


def event_line(event: ResultEvent) -> str:
    """One event as one line of text, for ``--follow`` without ``--json``."""
    completed, status, site, camera, lane, found, e2e, task_id, reason = _cells(event)
    line = f"{completed}  {status:<6}  {site}/{camera}  {lane:<8}  {task_id}"
    line += f"  {found}" if found else ""
    line += f"  {e2e} ms" if e2e else ""
    return line + (f"  reason: {reason}" if reason else "")


# ---- live events -------------------------------------------------------------------------------------------


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null, so the flush at exit does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


@contextlib.contextmanager
def _stop_on_signals(stopping: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    try:
        yield
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def _require_results_exchange(broker: Broker) -> None:
    if not await broker.exchange_exists(EXCHANGE_RESULTS):
        raise BrokerError(f"exchange {EXCHANGE_RESULTS} is not declared: run detfleet topology apply")


async def follow(broker: Broker, key: str, as_json: bool, limit: int | None, stopping: asyncio.Event) -> int:
    """Print each event bound by ``key`` until ``stopping`` is set (or ``limit`` events); how many."""
    shown = 0

    async def on_delivery(delivery: Delivery) -> None:
        nonlocal shown
        if limit is not None and shown >= limit:
            return  # past the limit: left unacked, gone with the temporary queue
        try:
            event = ResultEvent.from_json(delivery.envelope.body)
        except TaskValidationError as error:
            logger.warning("Skipped a message routed %s: %s", delivery.envelope.routing_key, error)
        else:
            try:
                _out(event.model_dump_json() if as_json else event_line(event))
            except BrokenPipeError:  # | head: the reader has what it wanted
                _silence_stdout()
                stopping.set()
                return
            shown += 1
            if limit is not None and shown >= limit:
                stopping.set()
        await delivery.ack()

    await _require_results_exchange(broker)
    subscription = await broker.subscribe(EXCHANGE_RESULTS, [key], on_delivery, queue=None)
    _err(f"{SUBSCRIBED} to {EXCHANGE_RESULTS} with {key} (Ctrl-C to stop)")
    try:
        await stopping.wait()
    finally:
        await subscription.cancel()
    if broker.is_closed:
        raise BrokerUnavailableError(f"following {EXCHANGE_RESULTS}: the broker connection was lost")
    await subscription.close()
    return shown


async def _follow_main(settings: SubscriberSettings, args: argparse.Namespace) -> int:
    key = binding_key(args.status, args.site, args.camera)
    stopping = asyncio.Event()
    broker = await Broker.connect(settings.amqp_url, "detfleet-results-follow", robust=False)
    broker.on_close(lambda loss: stopping.set())
    try:
        if not args.json:
            _out("  ".join(COLUMNS))
        with _stop_on_signals(stopping):
            await follow(broker, key, args.json, args.limit, stopping)
    finally:
        await broker.close()
    return 0


async def _read_main(settings: SubscriberSettings, args: argparse.Namespace) -> int:
    filters = RowFilters(args.camera, args.site, args.status, args.since, args.limit or DEFAULT_LIMIT)
    events = await read_rows(settings.database_url, filters)
    if args.json:
        for event in events:
            _out(event.model_dump_json())
    else:
        Console().print(rows_table(events))
    return 0


# ---- the forwarder -----------------------------------------------------------------------------------------


def webhook_secret(settings: SubscriberSettings, variable: str | None) -> bytes:
    """The signing key: from ``variable`` when named, else ``DETFLEET_WEBHOOK_SECRET``; never a flag."""
    if variable is None:
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
        named = SECRET_VARIABLE
    else:
        secret, named = os.environ.get(variable, ""), variable
    if not secret:
        raise SettingsError(
            f"{named}: no webhook secret (set it, or name another variable with --secret-env)"
        )
    return secret.encode()


async def _forward_main(settings: SubscriberSettings, args: argparse.Namespace) -> int:
    secret = webhook_secret(settings, args.secret_env)
    queue = webhook_queue(args.name)
    options = WebhookOptions(args.webhook, queue, (binding_key(args.status, args.site, args.camera),), secret)
    stopping = asyncio.Event()
    broker = await Broker.connect(settings.amqp_url, f"detfleet-results-forward:{args.name}", robust=False)
    try:
        with _stop_on_signals(stopping):
            report = await forward(
                broker,
                settings,
                options,
                stopping,
                ready=lambda: _err(
                    f"{SUBSCRIBED}: forwarding {queue} ({options.keys[0]}) to {mask_url(args.webhook)}; "
                    f"undeliverable events go to {parked_queue(queue)}"
                ),
            )
    finally:
        await broker.close()
    summary: dict[str, Any] = asdict(report)
    _out(json.dumps(summary) if args.json else "  ".join(f"{k} {v}" for k, v in summary.items()))
    return 0


# ---- arguments ---------------------------------------------------------------------------------------------


def _name(kind: str) -> Any:
    def parse(text: str) -> str:
        try:
            return check_name(kind, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {mask_url(text)!r}")
    return text


def _add_filters(parser: argparse.ArgumentParser, json_help: str) -> None:
    parser.add_argument("--camera", type=_name("camera"), metavar="C")
    parser.add_argument("--site", type=_name("site"), metavar="S")
    parser.add_argument("--status", choices=STATUSES)
    parser.add_argument("--json", action="store_true", help=json_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detfleet results",
        description="Result rows from Postgres, or live result events with --follow (docs/results.md). "
        "'detfleet results forward --help': the webhook forwarder.",
    )
    _add_filters(parser, "JSON lines in the result event schema (docs/results.md)")
    parser.add_argument("--since", type=_duration, metavar="D", help="completed within, e.g. 30m, 2h, 7d")
    parser.add_argument(
        "--limit",
        type=_positive,
        metavar="N",
        help=f"rows shown (default {DEFAULT_LIMIT}); --follow: stop after N",
    )
    parser.add_argument("--follow", action="store_true", help="print live events until Ctrl-C")
    return parser


def build_forward_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detfleet results forward",
        description="POST result events to a webhook, signed, retried, parked when undeliverable, "
        "in order per camera, until SIGTERM or Ctrl-C.",
    )
    parser.add_argument("--webhook", type=_http_url, required=True, metavar="URL")
    parser.add_argument(
        "--name",
        type=_name("name"),
        default=DEFAULT_WEBHOOK_NAME,
        help=f"names the durable queue detfleet.results.webhook.NAME (default {DEFAULT_WEBHOOK_NAME})",
    )
    _add_filters(parser, "the final summary as one JSON object")
    parser.add_argument(
        "--secret-env",
        metavar="VAR",
        help=f"environment variable holding the signing secret (default {SECRET_VARIABLE})",
    )
    return parser


def main(argv: Sequence[str]) -> int:
    args_list = list(argv)
    if args_list[:1] == ["forward"]:
        args = build_forward_parser().parse_args(args_list[1:])
        run = _forward_main
    else:
        parser = build_parser()
        args = parser.parse_args(args_list)
        if args.follow and args.since is not None:
            parser.error("--since reads stored rows; --follow shows events from now on")
        run = _follow_main if args.follow else _read_main
    settings = load_settings(SubscriberSettings)
    configure_logging(settings.log_level, settings.log_json)
    return asyncio.run(run(settings, args))
