"""Operations on the broker as a whole: apply the topology, bootstrap users. Used by the CLI and tests."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from shared.broker.aio import Broker
from shared.errors import SettingsError
from shared.management import Management
from shared.settings import AdminSettings
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
