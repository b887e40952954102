"""The topology module is the one place of names and arguments; definitions.json is generated from it."""

from __future__ import annotations

import json
from pathlib import Path

from shared.settings import TopologySettings
from shared.topology import Topology, definitions, retry_level_name, vhost_of

REPO = Path(__file__).resolve().parents[2]


def test_the_committed_definitions_are_those_of_the_defaults() -> None:
    committed = json.loads((REPO / "rabbitmq" / "definitions.json").read_text())
    assert committed == definitions(Topology.from_settings())


def test_limits_live_in_policies_never_in_queue_arguments() -> None:
    topology = Topology.from_settings()
    for queue in topology.queues:
        assert set(queue.arguments) == {"x-queue-type"}
    keys = {key for policy in topology.policies for key in policy.definition}
    assert keys == {"message-ttl", "max-length", "overflow", "dead-letter-exchange", "queue-mode"}


def test_only_the_bulk_lane_is_lazy() -> None:
    """The deep lane keeps its bodies on disk; realtime stays small and in memory for its latency."""
    lazy = [p.queue for p in Topology.from_settings().policies if p.definition.get("queue-mode") == "lazy"]
    assert lazy == ["detfleet.bulk"]


def test_each_queue_has_at_most_one_policy() -> None:
    queues = [p.queue for p in Topology.from_settings().policies]
    assert len(queues) == len(set(queues))


def test_quorum_queues_get_a_high_delivery_limit_as_a_backstop_and_three_replicas() -> None:
    topology = Topology.from_settings(TopologySettings(queue_type="quorum"))
    assert [q.name for q in topology.queues] == [
        "detfleet.realtime",
        "detfleet.bulk",
        "detfleet.intake",
        "detfleet.retry.1s",
        "detfleet.retry.10s",
        "detfleet.retry.60s",
        "detfleet.retry.ready",
        "detfleet.dlq",
    ]
    assert all(
        q.arguments == {"x-queue-type": "quorum", "x-delivery-limit": 1000, "x-quorum-initial-group-size": 3}
        for q in topology.queues
    )


def test_quorum_queues_dead_letter_at_least_once_except_the_drop_head_realtime_lane() -> None:
    policies = {
        p.queue: p.definition for p in Topology.from_settings(TopologySettings(queue_type="quorum")).policies
    }
    for queue in ("detfleet.bulk", "detfleet.retry.1s", "detfleet.retry.10s", "detfleet.retry.60s"):
        assert policies[queue]["dead-letter-strategy"] == "at-least-once"
        assert policies[queue]["overflow"] == "reject-publish"  # at-least-once is honoured only with it
    assert policies["detfleet.realtime"]["overflow"] == "drop-head"
    assert "dead-letter-strategy" not in policies["detfleet.realtime"]


def test_classic_queues_keep_their_policies_without_quorum_keys() -> None:
    for policy in Topology.from_settings().policies:
        assert "dead-letter-strategy" not in policy.definition
    assert all(q.arguments == {"x-queue-type": "classic"} for q in Topology.from_settings().queues)


def test_retry_levels_follow_the_delays_and_the_last_repeats() -> None:
    topology = Topology.from_settings(TopologySettings(retry_delays_ms=(250, 1000, 60000)))
    assert topology.retry_levels == ("detfleet.retry.250ms", "detfleet.retry.1s", "detfleet.retry.60s")
    assert [topology.retry_level_for(a) for a in (2, 3, 4, 9)] == [
        "detfleet.retry.250ms",
        "detfleet.retry.1s",
        "detfleet.retry.60s",
        "detfleet.retry.60s",
    ]
    assert retry_level_name(10_000) == "detfleet.retry.10s"


def test_the_lanes_behave_as_designed() -> None:
    policies = {p.queue: p.definition for p in Topology.from_settings().policies}
    assert policies["detfleet.realtime"]["overflow"] == "drop-head"
    assert policies["detfleet.realtime"]["message-ttl"] == 10_000
    assert policies["detfleet.bulk"]["overflow"] == "reject-publish"
    assert policies["detfleet.bulk"]["dead-letter-exchange"] == "detfleet.intake"
    assert policies["detfleet.retry.1s"] == {
        "message-ttl": 1000,
        "dead-letter-exchange": "detfleet.retry.ready",
    }


def test_vhost_of_reads_the_url_path() -> None:
    assert vhost_of("amqp://guest:guest@host:5672/") == "/"
    assert vhost_of("amqp://guest:guest@host:5672") == "/"
    assert vhost_of("amqp://guest:guest@host:5672/%2F") == "/"
    assert vhost_of("amqp://guest:guest@host:5672/fleet-a") == "fleet-a"


def test_quorum_policies_leave_out_queue_mode_which_rabbitmq_3_10_would_refuse_them_for() -> None:
    topology = Topology.from_settings(TopologySettings(queue_type="quorum"))
    assert all("queue-mode" not in p.definition for p in topology.policies)
