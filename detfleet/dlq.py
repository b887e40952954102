"""``detfleet dlq``: inspect, replay and purge the dead-letter queue.

Listing peeks: it holds the entries it reads and hands them all back at the end, so they keep their order.
Replaying republishes each entry to ``detfleet.frames`` with its original routing key, the dead-letter
headers removed and the attempt count reset, confirmed, and only then removes it from the DLQ; entries of a
task id already replayed in the same run are dropped as duplicates (a crash can leave two copies).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from shared.broker.aio import Broker, Delivery
from shared.errors import BrokerError
from shared.logs import configure_logging
from shared.schema import (
    H_ATTEMPT,
    H_FAILED_AT,
    H_ORIGINAL_ROUTING_KEY,
    H_REASON,
    replay_copy,
)
from shared.settings import AdminSettings, load_settings
from shared.topology import EXCHANGE_FRAMES, QUEUE_DLQ


@dataclass(frozen=True)
class Entry:
    task_id: str | None
    reason: str
    routing_key: str
    attempt: Any
    failed_at: str | None
    size: int


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def describe(delivery: Delivery) -> Entry:
    envelope = delivery.envelope
    headers = envelope.headers
    return Entry(
        task_id=envelope.message_id,
        reason=_text(headers.get(H_REASON, "(no reason recorded)")),
        routing_key=_text(headers.get(H_ORIGINAL_ROUTING_KEY, envelope.routing_key)),
        attempt=headers.get(H_ATTEMPT),
        failed_at=_text(headers[H_FAILED_AT]) if H_FAILED_AT in headers else None,
        size=len(envelope.body),
    )


async def list_entries(broker: Broker, limit: int) -> list[Entry]:
    """Up to ``limit`` entries from the head of the DLQ, left in place."""
    held: list[Delivery] = []
    async with broker.reading(QUEUE_DLQ) as reader:
        while len(held) < limit and (delivery := await reader.get()) is not None:
            held.append(delivery)
        for delivery in held:
            await delivery.requeue()
    return [describe(d) for d in held]


@dataclass
class ReplayReport:
    replayed: int = 0
    duplicates: int = 0
    skipped: int = 0


async def replay(broker: Broker, limit: int, reason_contains: str | None = None) -> ReplayReport:
    """Republish up to ``limit`` entries (those whose reason contains the text, if given)."""
    report, seen, skipped = ReplayReport(), set[str](), list[Delivery]()
    async with broker.reading(QUEUE_DLQ) as reader:
        try:
            while (
                report.replayed + report.duplicates < limit and (delivery := await reader.get()) is not None
            ):
                entry = describe(delivery)
                if reason_contains and reason_contains not in entry.reason:
                    skipped.append(delivery)
                elif entry.task_id in seen:
                    report.duplicates += 1
                    await delivery.ack()
                else:
                    await broker.publish(replay_copy(delivery.envelope), EXCHANGE_FRAMES)
                    await delivery.ack()
                    seen.add(entry.task_id or "")
                    report.replayed += 1
        finally:
            for delivery in skipped:  # back where they were, in order
                await delivery.requeue()
    report.skipped = len(skipped)
    return report


def _table(entries: Sequence[Entry]) -> Table:
    table = Table(title=f"{QUEUE_DLQ}: {len(entries)} entries shown")
    for column in ("task id", "reason", "routing key", "attempt", "failed at", "bytes"):
        table.add_column(column)
    for e in entries:
        table.add_row(str(e.task_id), e.reason, e.routing_key, str(e.attempt), str(e.failed_at), str(e.size))
    return table


async def _run(settings: AdminSettings, args: argparse.Namespace) -> int:
    broker = await Broker.connect(settings.amqp_url, "detfleet-dlq", robust=False)
    try:
        if args.action == "list":
            entries = await list_entries(broker, args.limit)
            if args.json:
                print(json.dumps([asdict(e) for e in entries], default=str))
            else:
                Console().print(_table(entries))
        elif args.action == "replay":
            result = await replay(broker, args.limit, args.reason)
            print(
                f"replayed {result.replayed}, dropped {result.duplicates} duplicates, left {result.skipped}"
            )
        else:
            if not args.yes:
                print("detfleet dlq purge deletes every entry; run it again with --yes")
                return 2
            print(f"purged {await broker.purge(QUEUE_DLQ)} entries")
    except BrokerError as error:
        print(f"detfleet dlq: error: {error}")
        return 2
    finally:
        await broker.close()
    return 0


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="detfleet dlq", description="The dead-letter queue.")
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser("list", help="show the entries at the head of the DLQ, leaving them in place")
    show.add_argument("--limit", type=int, default=50)
    show.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    again = sub.add_parser("replay", help="republish entries to their lane (after the cause is fixed)")
    again.add_argument("--limit", type=int, default=1000)
    again.add_argument("--reason", help="only entries whose reason contains this text")
    purge = sub.add_parser("purge", help="delete every entry")
    purge.add_argument("--yes", action="store_true", help="really delete them")
    args = parser.parse_args(argv)
    settings = load_settings(AdminSettings)
    configure_logging(settings.log_level, settings.log_json)
    return asyncio.run(_run(settings, args))
