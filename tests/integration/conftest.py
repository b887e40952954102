"""Real RabbitMQ and Postgres, each test in its own vhost and its own database, cleaned up after.

A missing service fails the test with one line naming it (never a skip): CI must not go green on
tests that did not run.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from shared import admin, db
from shared.broker.aio import Broker
from shared.management import Management
from shared.settings import DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL, DEFAULT_MANAGEMENT_URL, AdminSettings
from tests.chaos.nodes import NodeError, PrivateRabbit

pytestmark = pytest.mark.integration


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def amqp_url_for(vhost: str, base: str = DEFAULT_AMQP_URL) -> str:
    return base.rstrip("/") + "/" + vhost


@pytest.fixture
async def management() -> AsyncIterator[Management]:
    async with Management(DEFAULT_MANAGEMENT_URL) as api:
        yield api


@pytest.fixture
async def vhost(management: Management, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A fresh vhost the guest user may use, deleted (with everything in it) after the test."""
    name = _unique("detfleet-test-")
    await management.create_vhost(name)
    await management.grant(name, "guest")
    yield name
    await management.delete_vhost(name)


@pytest.fixture
def admin_settings(vhost: str) -> AdminSettings:
    return AdminSettings(amqp_url=amqp_url_for(vhost), database_url=DEFAULT_DATABASE_URL)


@pytest.fixture
async def topology_settings(admin_settings: AdminSettings) -> AdminSettings:
    """A vhost with detfleet's topology applied."""
    await admin.apply_topology(admin_settings)
    return admin_settings


@pytest.fixture
async def broker(topology_settings: AdminSettings, request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    connection = await Broker.connect(topology_settings.amqp_url, f"test:{request.node.nodeid}")
    yield connection
    await connection.close()


@pytest.fixture
async def database_url() -> AsyncIterator[str]:
    """A fresh, empty database on the shared server, dropped after the test."""
    url = DEFAULT_DATABASE_URL.rsplit("/", 1)[0] + "/" + _unique("detfleet_test_")
    await db.ensure_database(url)
    yield url
    await db.drop_database(url)


@pytest.fixture
async def results_db(database_url: str) -> str:
    """A fresh database with every migration applied: the consumer's results table is there."""
    await db.migrate(database_url)
    return database_url


@pytest.fixture
def private_rabbit() -> Iterator[PrivateRabbit]:
    """A RabbitMQ node of the test's own, which it may stop and start; stopped and removed after."""
    root = Path(tempfile.mkdtemp(prefix="detfleet-node-"))
    node = PrivateRabbit(root / "rabbit")
    try:
        node.start()
        yield node
    finally:
        try:
            node.stop()
        except NodeError:
            node.kill()
        shutil.rmtree(root, ignore_errors=True)
