"""Operations on the broker as a whole: apply the topology, bootstrap users, write the boot definitions.

Used by the CLI and tests; ``python -m shared.admin boot-definitions`` is the compose step before the broker.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from shared.broker.aio import Broker
from shared.errors import DetfleetError, SettingsError
from shared.logs import configure_logging
from shared.management import Management
from shared.settings import AdminSettings, load_settings
from shared.topology import POLICY_PREFIX, USERS, Topology, vhost_of

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopologyReport:
    vhost: str
    queues: int
    policies: int
    removed_policies: tuple[str, ...]


async def apply_topology(settings: AdminSettings) -> TopologyReport:
    """Declare exchanges, queues and bindings over AMQP and set the policies; safe to run again."""
    topology = Topology.from_settings(settings)
    vhost = vhost_of(settings.amqp_url)
    broker = await Broker.connect(settings.amqp_url, "detfleet-topology", robust=False)
    try:
        await broker.declare(topology)
    finally:
        await broker.close()
    async with Management(settings.management_url) as api:
        for policy in topology.policies:
            await api.set_policy(vhost, policy)
        removed = await _remove_stale_policies(api, vhost, {p.name for p in topology.policies})
    logger.info("Topology applied to vhost %s", vhost)
    return TopologyReport(vhost, len(topology.queues), len(topology.policies), removed)


async def _remove_stale_policies(api: Management, vhost: str, wanted: set[str]) -> tuple[str, ...]:
    """Delete our policies that the topology no longer has (e.g. a retry level taken out)."""
    stale = tuple(
        p["name"]
        for p in await api.policies(vhost)
        if p["name"].startswith(POLICY_PREFIX) and p["name"] not in wanted
    )
    for name in stale:
        await api.delete_policy(vhost, name)
    return stale


async def bootstrap_users(settings: AdminSettings) -> list[str]:
    """Create or update detfleet's broker users with passwords from the environment or secret files."""
    vhost = vhost_of(settings.amqp_url)
    missing = [u.name for u in USERS if settings.password_for(u.name) is None]
    if missing:
        variable = "DETFLEET_" + missing[0].removeprefix("detfleet-").upper() + "_PASSWORD"
        raise SettingsError(
            f"{variable}: no password for {missing[0]} (set it, or a file in DETFLEET_SECRETS_DIR)"
        )
    async with Management(settings.management_url) as api:
        for user in USERS:
            await api.put_user(user, settings.password_for(user.name) or "")
            await api.grant(vhost, user.name, user.configure, user.write, user.read)
    return [u.name for u in USERS]


# RabbitMQ creates no default user when it loads definitions at boot, and definitions.json holds no password:
# without an administrator written beside it, nobody could log in to set the others' passwords.
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
ADMIN_DEFINITIONS = "admin.json"
DETFLEET_DEFINITIONS = "detfleet.json"


def rabbit_password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's salted SHA-256 hash: base64(salt + sha256(salt + password)) with a 4-byte salt."""
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def admin_identity(management_url: str) -> tuple[str, str]:
    """The administrator named by the management URL, the identity the set-up steps use."""
    parts = urlsplit(management_url)
    user, password = unquote(parts.username or ""), unquote(parts.password or "")
    if not user or not password:
        raise SettingsError("DETFLEET_MANAGEMENT_URL: name the administrator as user:password@host")
    if user == "guest":
        raise SettingsError(
            "DETFLEET_MANAGEMENT_URL: guest may only connect from localhost; name another user"
        )
    return user, password


def admin_definitions(user: str, password: str, vhost: str) -> dict[str, Any]:
    """A definitions document with one administrator; it names the vhost so that import order is free."""
    return {
        "users": [
            {
                "name": user,
                "password_hash": rabbit_password_hash(password),
                "hashing_algorithm": HASHING_ALGORITHM,
                "tags": "administrator",
            }
        ],
        "vhosts": [{"name": vhost}],
        "permissions": [{"user": user, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}],
    }


def write_boot_definitions(settings: AdminSettings, shipped: Path, into: Path) -> list[Path]:
    """Fill the folder RabbitMQ's ``load_definitions`` reads: detfleet's definitions and an administrator."""
    try:
        detfleet = json.loads(shipped.read_text())
    except (OSError, ValueError) as error:
        raise SettingsError(f"{shipped}: cannot read the definitions: {error}") from None
    user, password = admin_identity(settings.management_url)
    into.mkdir(parents=True, exist_ok=True)
    written = [into / DETFLEET_DEFINITIONS, into / ADMIN_DEFINITIONS]
    written[0].write_text(json.dumps(detfleet, indent=2, sort_keys=True) + "\n")
    admin = admin_definitions(user, password, vhost_of(settings.amqp_url))
    # The broker's own user reads it in another container; it holds a salted hash, never the password.
    written[1].write_text(json.dumps(admin, indent=2) + "\n")
    for path in written:
        path.chmod(0o644)
    logger.info("Boot definitions with administrator %s written to %s", user, into)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shared.admin boot-definitions``: the compose step that runs before the broker starts."""
    parser = argparse.ArgumentParser(prog="python -m shared.admin", description=main.__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    boot = sub.add_parser(
        "boot-definitions", help="write definitions.json and an administrator into a folder"
    )
    boot.add_argument("--definitions", type=Path, required=True, help="detfleet's definitions.json")
    boot.add_argument("--into", type=Path, required=True, help="the folder load_definitions names")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(AdminSettings)
        configure_logging(settings.log_level, settings.log_json)
        for path in write_boot_definitions(settings, args.definitions, args.into):
            print(path)
    except DetfleetError as error:
        print(f"{parser.prog} {args.action}: error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
