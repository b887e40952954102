"""definitions.json and `detfleet topology apply` give the same vhost state; apply is idempotent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared import admin
from shared.management import Management
from shared.settings import AdminSettings
from shared.topology import PolicySpec, vhost_of

REPO = Path(__file__).resolve().parents[2]
VHOST_SCOPED = ("exchanges", "queues", "bindings", "policies")


def comparable(exported: dict[str, Any]) -> dict[str, list[str]]:
    """The vhost-scoped parts of an export, without the vhost name, as sorted canonical JSON."""
    out = {}
    for kind in VHOST_SCOPED:
        items = [{k: v for k, v in item.items() if k != "vhost"} for item in exported.get(kind, [])]
        out[kind] = sorted(json.dumps(i, sort_keys=True) for i in items)
    return out


@pytest.fixture
async def second_vhost(management: Management, vhost: str) -> Any:
    name = vhost + "-defs"
    await management.create_vhost(name)
    await management.grant(name, "guest")
    yield name
    await management.delete_vhost(name)


async def test_definitions_file_and_apply_give_identical_state(
    management: Management, topology_settings: AdminSettings, second_vhost: str
) -> None:
    committed = json.loads((REPO / "rabbitmq" / "definitions.json").read_text())
    await management.load_definitions(second_vhost, {k: committed[k] for k in VHOST_SCOPED})

    applied = await management.export_definitions(vhost_of(topology_settings.amqp_url))
    loaded = await management.export_definitions(second_vhost)

    assert comparable(applied) == comparable(loaded)
    assert len(comparable(applied)["queues"]) == 8
    assert len(comparable(applied)["policies"]) == 5


async def test_apply_is_idempotent_and_removes_stale_policies(
    management: Management, topology_settings: AdminSettings
) -> None:
    vhost = vhost_of(topology_settings.amqp_url)
    before = comparable(await management.export_definitions(vhost))
    stale = PolicySpec("detfleet-retry.5m", "detfleet.retry.5m", {"message-ttl": 300_000})
    await management.set_policy(vhost, stale)

    report = await admin.apply_topology(topology_settings)

    assert report.removed_policies == ("detfleet-retry.5m",)
    assert comparable(await management.export_definitions(vhost)) == before


async def test_each_lane_queue_runs_under_its_policy(
    management: Management, topology_settings: AdminSettings
) -> None:
    vhost = vhost_of(topology_settings.amqp_url)
    bulk = await management.queue(vhost, "detfleet.bulk")
    # The management API reports the effective policy once the queue has picked it up.
    assert bulk["arguments"] == {"x-queue-type": "classic"}
    policies = {p["name"]: p for p in await management.policies(vhost)}
    assert policies["detfleet-bulk"]["definition"]["overflow"] == "reject-publish"
