"""The compose stack boots as compose would boot it, without Docker: frames become rows.

A private RabbitMQ node starts from the shipped rabbitmq.conf, enabled_plugins and definitions; a private
Postgres runs the postgres service's init script. The set-up steps run with compose's exact commands and
environment (tests/support/compose_stack.py), then the demo producer and a consumer, each logged in as its
role user: the broker user of its role and, for the consumer, the database's writer role.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from shared.management import Management
from tests.chaos.nodes import free_port
from tests.support.compose_stack import ComposeBoot

pytestmark = pytest.mark.integration

DEMO_FRAMES = 6  # twice round the three demo frames: --loop is part of the producer's command
ROWS_LIMIT_S = 90  # a bound against a hang; the rows come in seconds


@pytest.fixture(scope="module")
def stack() -> Iterator[ComposeBoot]:
    with ComposeBoot() as booted:
        yield booted


def test_the_setup_steps_succeed_with_the_compose_environment(stack: ComposeBoot) -> None:
    assert [s.service for s in stack.steps] == ["broker-definitions", "broker-users", "topology", "migrate"]
    assert all(s.returncode == 0 for s in stack.steps)
    assert "detfleet-consumer" in next(s.output for s in stack.steps if s.service == "broker-users")


async def test_the_broker_has_the_roles_the_topology_and_both_plugins_and_no_guest(
    stack: ComposeBoot,
) -> None:
    async with Management(stack.rabbit.management_url) as api:
        users = {u["name"]: u["tags"] for u in await api.request("GET", "/users")}
        queues = {q["name"] for q in await api.request("GET", "/queues/%2F")}
        listeners = {x["protocol"] for x in (await api.request("GET", "/overview"))["listeners"]}
    assert set(users) == {
        "detfleet-admin",
        "detfleet-producer",
        "detfleet-consumer",
        "detfleet-ops",
        "detfleet-monitoring",
        "detfleet-subscriber",
        "detfleet-gateway",
    }
    assert {"detfleet.realtime", "detfleet.bulk", "detfleet.dlq", "detfleet.retry.ready"} <= queues
    assert {"amqp", "http", "http/prometheus"} <= listeners  # both plugins of enabled_plugins


async def produce(stack: ComposeBoot) -> dict[str, object]:
    """The demo producer's own command, bounded to DEMO_FRAMES frames so that it ends."""
    result = await asyncio.to_thread(stack.run_step, "producer", "--limit", str(DEMO_FRAMES), "--json")
    summary: dict[str, object] = json.loads(result.output.strip().splitlines()[-1])
    return summary


async def rows(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch("SELECT status, consumer_id, provider FROM detfleet_results"))
    finally:
        await conn.close()


@contextlib.contextmanager
def consumer(stack: ComposeBoot, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The consumer service's command and environment; only the health port is this machine's own."""
    env = stack.environment("consumer", DETFLEET_HEALTH_PORT=str(free_port()), DETFLEET_CONSUMER_ID="boot")
    with log.open("wb") as output:
        process = subprocess.Popen(
            stack.command("consumer"), env=env, cwd=stack.root, stdout=output, stderr=output
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


async def test_frames_from_the_producer_become_rows_through_the_role_users(
    stack: ComposeBoot, tmp_path: Path
) -> None:
    consumer_env = stack.environment("consumer")
    assert consumer_env["DETFLEET_AMQP_URL"].startswith("amqp://detfleet-consumer:")
    assert consumer_env["DETFLEET_DATABASE_URL"].startswith("postgresql://detfleet_writer:")
    assert stack.amqp_url("producer").startswith("amqp://detfleet-producer:")

    summary = await produce(stack)
    assert summary["confirmed"] == DEMO_FRAMES

    log = tmp_path / "consumer.log"
    with consumer(stack, log) as process:
        reader = stack.database_url("detfleet_reader", "DB_READER_PASSWORD")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ROWS_LIMIT_S
        while len(found := await rows(reader)) < DEMO_FRAMES:
            assert process.poll() is None, log.read_text()[-3000:]
            assert loop.time() < deadline, f"{len(found)} rows; consumer log:\n{log.read_text()[-3000:]}"
            await asyncio.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 60) == 0, log.read_text()[-3000:]
    assert [r["status"] for r in found] == ["ok"] * DEMO_FRAMES
    assert {r["consumer_id"] for r in found} == {"boot"}
    assert {r["provider"] for r in found} == {"CPUExecutionProvider"}
