"""Operations commands: ``detfleet topology``, ``detfleet broker``, ``detfleet db``, ``detfleet dlq``."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from datetime import timedelta

from detfleet.dlq_index import parse_duration
from shared import admin, db
from shared.logs import configure_logging
from shared.settings import AdminSettings, load_settings, mask_url
from shared.topology import Topology, definitions


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _settings() -> AdminSettings:
    settings = load_settings(AdminSettings)
    configure_logging(settings.log_level, settings.log_json)
    return settings


def topology_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="detfleet topology", description="The broker topology.")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("apply", help="declare exchanges, queues, bindings and policies (idempotent)")
    show = sub.add_parser("definitions", help="print rabbitmq/definitions.json for the current settings")
    show.add_argument("--vhost", default="/", help="vhost the definitions name (default /)")
    args = parser.parse_args(argv)
    settings = _settings()
    if args.action == "definitions":
        doc = definitions(Topology.from_settings(settings), vhost=args.vhost)
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    report = asyncio.run(admin.apply_topology(settings))
    print(
        f"topology applied to vhost {report.vhost!r} on {mask_url(settings.amqp_url)}: "
        f"{report.queues} queues, {report.policies} policies"
        + (
            f", removed stale policies {', '.join(report.removed_policies)}"
            if report.removed_policies
            else ""
        )
    )
    return 0


def broker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="detfleet broker", description="Broker users.")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser(
        "bootstrap",
        help="create detfleet's users with passwords from DETFLEET_*_PASSWORD or DETFLEET_SECRETS_DIR",
    )
    parser.parse_args(argv)
    users = asyncio.run(admin.bootstrap_users(_settings()))
    print(f"users ready: {', '.join(users)}")
    return 0


def db_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="detfleet db", description="The results database.")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("migrate", help="create the database if missing and apply pending migrations")
    prune = sub.add_parser("prune", help="delete result rows older than a duration, in batches")
    prune.add_argument("--older-than", type=_duration, required=True, metavar="D", help="e.g. 30d, 12h")
    prune.add_argument("--status", choices=("ok", "failed", "shed"), help="only rows of this status")
    args = parser.parse_args(argv)
    settings = _settings()
    if args.action == "prune":
        removed = asyncio.run(db.prune(settings.database_url, args.older_than, args.status))
        accepted = asyncio.run(db.prune_accepted(settings.database_url, args.older_than))
        print(
            f"pruned {removed} rows and {accepted} HTTP gateway acceptances from "
            f"{db.database_name(settings.database_url)}"
        )
        return 0
    applied = asyncio.run(db.migrate(settings.database_url))
    names = ", ".join(f"{m.version:04d}_{m.name}" for m in applied) or "none pending"
    print(f"database {db.database_name(settings.database_url)} migrated: {names}")
    return 0
