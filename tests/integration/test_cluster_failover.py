"""Client failover on private servers: two broker nodes and a Postgres primary with a streaming standby.

The gateway and the worker are given every node (``DETFLEET_AMQP_URL=a,b``) and both database hosts with
``target_session_attrs=read-write``. Frames flow, the first broker node is killed with SIGKILL, frames keep
flowing through the second; then the primary stops and the standby is promoted, and the same worker process
writes the next rows on the new primary. Every confirmed frame ends as exactly one row.

The two nodes are separate single-node brokers, not a cluster (a cluster costs three boots; the drill, ``make
drill``, runs one): what is under test is the clients' walk over the list, which is the same either way.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from consumer.detector.fake import FakeDetector
from producer.publisher import AsyncPublisher
from shared import admin, db
from shared.broker.aio import Broker
from shared.broker.publishing import ConfirmChannel
from shared.broker.quarantine import quarantine_undecodable
from shared.settings import AdminSettings, ProducerSettings
from shared.topology import EXCHANGE_FRAMES, QUEUE_BULK
from tests.chaos.nodes import LOOPBACK, NodeError, PrivatePostgres, PrivateRabbit, free_port
from tests.integration.consumer_support import consumer_settings, jpeg, running

pytestmark = pytest.mark.integration

DATABASE = "detfleet_failover"
ROWS_LIMIT_S = 60.0  # a bound against a hang, far above the few seconds a failover takes here


@dataclass
class Servers:
    first: PrivateRabbit
    second: PrivateRabbit
    primary: PrivatePostgres
    standby: PrivatePostgres

    @property
    def amqp_url(self) -> str:
        return f"{self.first.amqp_url},{self.second.amqp_url}"

    @property
    def database_url(self) -> str:
        hosts = f"{LOOPBACK}:{self.primary.port},{LOOPBACK}:{self.standby.port}"
        return f"postgresql://postgres@{hosts}/{DATABASE}?target_session_attrs=read-write"


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    root = Path(tempfile.mkdtemp(prefix="detfleet-failover-"))
    root.chmod(0o755)  # the postgres user must reach its data directory
    first, second = PrivateRabbit(root / "first"), PrivateRabbit(root / "second")
    primary = PrivatePostgres(root / "primary", DATABASE)
    standby = PrivatePostgres(root / "standby", DATABASE)
    try:
        with ThreadPoolExecutor(2) as pool:  # two boots overlap: most of a boot is waiting
            list(pool.map(PrivateRabbit.start, (first, second)))
        primary.init()
        primary.start()
        standby.init_standby_of(primary)
        standby.start()
        yield Servers(first, second, primary, standby)
    finally:
        for node in (first, second, primary, standby):
            try:
                node.stop()
            except NodeError:
                node.kill()
        shutil.rmtree(root, ignore_errors=True)


async def row_ids(url: str) -> set[uuid.UUID]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return {r["task_id"] for r in await conn.fetch("SELECT task_id FROM detfleet_results")}
    finally:
        await conn.close()


async def wait_for_rows(url: str, wanted: set[uuid.UUID]) -> set[uuid.UUID]:
    deadline = time.monotonic() + ROWS_LIMIT_S
    while not wanted <= (found := await row_ids(url)):
        assert time.monotonic() < deadline, f"{len(wanted - found)} rows missing after {ROWS_LIMIT_S:g} s"
        await asyncio.sleep(0.2)
    return found


async def publish(publisher: AsyncPublisher, start: int, count: int) -> set[uuid.UUID]:
    ids = [publisher.publish(jpeg(i), camera="cam-failover", site="dr") for i in range(start, start + count)]
    return set(await asyncio.gather(*ids))


async def test_gateway_and_worker_move_to_the_next_node_and_follow_the_promoted_standby(
    servers: Servers,
) -> None:
    for node in (servers.first, servers.second):  # single nodes: each needs the topology of its own
        await admin.apply_topology(AdminSettings(amqp_url=node.amqp_url, management_url=node.management_url))
    await db.migrate(servers.database_url)
    admin_settings = AdminSettings(amqp_url=servers.amqp_url, log_json=False)
    settings = consumer_settings(admin_settings, servers.database_url, exit_when_idle_s=None)
    producer = ProducerSettings(amqp_url=servers.amqp_url, lane="bulk", log_json=False, nack_retries=0)

    async with running(settings, FakeDetector()), AsyncPublisher(producer) as publisher:
        before = await publish(publisher, 0, 5)
        await wait_for_rows(servers.database_url, before)

        servers.first.kill()  # kill -9 of the node both clients are on
        after_broker = await publish(publisher, 5, 5)
        await wait_for_rows(servers.database_url, before | after_broker)
        probe = await Broker.connect(servers.amqp_url, "test:failover-probe", robust=False)
        assert probe.url == servers.second.amqp_url
        await probe.close()

        servers.primary.stop()
        servers.standby.promote()
        after_database = await publish(publisher, 10, 5)
        confirmed = before | after_broker | after_database
        found = await wait_for_rows(servers.database_url, confirmed)

    promoted = f"postgresql://postgres@{LOOPBACK}:{servers.standby.port}/{DATABASE}"
    assert found == await row_ids(promoted) == confirmed  # one row per confirmed frame, on the new primary


async def test_every_client_skips_a_node_that_does_not_answer(topology_settings: AdminSettings) -> None:
    """The consumer's and ops' connection, the gateway's confirm channel and the pika sweep all walk the
    list: a first node nobody listens on is passed over for the shared broker behind it."""
    live = topology_settings.amqp_url
    nodes = f"amqp://guest:guest@{LOOPBACK}:{free_port()}/{live.rsplit('/', 1)[1]},{live}"

    broker = await Broker.connect(nodes, "test:walk", robust=False)
    assert broker.url == live
    await broker.close()
    channel = await ConfirmChannel.open(nodes, "test:walk-publish", EXCHANGE_FRAMES)
    assert channel.url == live
    await channel.close()
    report = await asyncio.to_thread(quarantine_undecodable, nodes, [QUEUE_BULK], "")
    assert report.scanned == 0
