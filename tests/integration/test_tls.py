"""TLS end to end: ``amqps://`` and Postgres ``sslmode=verify-full``, client certificates both ways.

A private RabbitMQ node listens for amqps and requires a client certificate; a private Postgres accepts
only TLS logins with a client certificate (``hostssl ... clientcert=verify-full``). The certificates come
from a throw-away CA the test makes. The CLI sets both up, a frame published over TLS becomes a row
written by a worker that reaches both over TLS, and a client missing its certificate or trusting another
CA is refused with one line.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest

from consumer.detector.fake import FakeDetector
from producer.blocking import BlockingPublisher
from shared.broker.quarantine import quarantine_undecodable
from shared.settings import AdminSettings, ProducerSettings
from shared.topology import QUEUE_BULK
from tests.chaos.nodes import LOOPBACK, NodeError, PrivatePostgres, PrivateRabbit, ServerTls
from tests.integration.consumer_support import consumer_settings, jpeg, rows_by_id, run_until_idle
from tests.support.certificates import Certificates, make_certificates

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]  # two private servers start first

RUN_TIMEOUT_S = 90  # a bound against a hang, not a timing assertion
DATABASE = "detfleet_tls"


@dataclass(frozen=True)
class TlsServers:
    certs: Certificates
    rabbit: PrivateRabbit
    postgres: PrivatePostgres

    def amqp_url(self, **files: Path) -> str:
        query = urlencode({k: str(v) for k, v in files.items()})
        return f"amqps://guest:guest@{LOOPBACK}:{self.rabbit.amqps_port}/?{query}"

    @property
    def good_amqp_url(self) -> str:
        c = self.certs
        return self.amqp_url(cafile=c.ca, certfile=c.client_cert, keyfile=c.client_key)

    def database_url(self, **params: str | Path) -> str:
        query = urlencode({"sslmode": "verify-full", **{k: str(v) for k, v in params.items()}})
        return f"postgresql://postgres@{LOOPBACK}:{self.postgres.port}/{DATABASE}?{query}"

    @property
    def good_database_url(self) -> str:
        c = self.certs
        return self.database_url(sslrootcert=c.ca, sslcert=c.client_cert, sslkey=c.client_key)


@pytest.fixture(scope="module")
def servers() -> Iterator[TlsServers]:
    root = Path(tempfile.mkdtemp(prefix="detfleet-tls-"))
    root.chmod(0o755)  # the postgres user must reach its data directory
    certs = make_certificates(root / "certs")
    tls = ServerTls(ca=certs.ca, cert=certs.server_cert, key=certs.server_key)
    rabbit = PrivateRabbit(root / "rabbit", tls=tls)
    postgres = PrivatePostgres(root / "postgres", database=DATABASE)
    try:
        postgres.init()
        postgres.require_client_certificates(tls)
        postgres.start()
        rabbit.start()
        yield TlsServers(certs, rabbit, postgres)
    finally:
        for node in (rabbit, postgres):
            try:
                node.stop()
            except NodeError:
                node.kill()
        shutil.rmtree(root, ignore_errors=True)


async def detfleet(*args: str, amqp_url: str, database_url: str, management_url: str) -> tuple[int, str]:
    """Run the CLI with only these settings; returns the exit code and stderr."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DETFLEET_")}
    env = clean | {
        "DETFLEET_LOG_LEVEL": "WARNING",
        "DETFLEET_AMQP_URL": amqp_url,
        "DETFLEET_DATABASE_URL": database_url,
        "DETFLEET_MANAGEMENT_URL": management_url,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "detfleet", *args, env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT_S)
    return process.returncode or 0, err.decode()


async def setup_over_tls(servers: TlsServers) -> None:
    urls = {
        "amqp_url": servers.good_amqp_url,
        "database_url": servers.good_database_url,
        "management_url": servers.rabbit.management_url,
    }
    for command in (("topology", "apply"), ("db", "migrate")):
        code, err = await detfleet(*command, **urls)
        assert code == 0, err


async def test_topology_and_migrations_apply_over_tls(servers: TlsServers) -> None:
    await setup_over_tls(servers)


def publish_frames(settings: ProducerSettings, count: int) -> list[uuid.UUID]:
    with BlockingPublisher(settings) as publisher:
        return [publisher.publish(jpeg(i), camera="cam-tls", site="site-tls") for i in range(count)]


async def test_a_frame_published_over_tls_becomes_a_row_written_over_tls(servers: TlsServers) -> None:
    await setup_over_tls(servers)
    producer = ProducerSettings(amqp_url=servers.good_amqp_url, lane="bulk", log_json=False)
    task_ids = await asyncio.to_thread(publish_frames, producer, 3)

    admin = AdminSettings(amqp_url=servers.good_amqp_url, log_json=False)
    settings = consumer_settings(admin, servers.good_database_url)
    await run_until_idle(settings, FakeDetector())

    rows = await rows_by_id(servers.good_database_url)
    assert set(task_ids) <= set(rows)
    assert {rows[t]["status"] for t in task_ids} == {"ok"}


async def test_the_pika_sweep_connects_over_tls(servers: TlsServers) -> None:
    await setup_over_tls(servers)
    report = await asyncio.to_thread(quarantine_undecodable, servers.good_amqp_url, [QUEUE_BULK], "")
    assert report.quarantined == ()


CLIENT = {"certfile": "client_cert", "keyfile": "client_key"}
DB_CLIENT = {"sslcert": "client_cert", "sslkey": "client_key"}
# case: (which server, the URL's certificate parameters as Certificates fields, what the line must say)
REFUSED: dict[str, tuple[str, dict[str, str], str]] = {
    "broker, no client certificate": (
        "amqp", {"cafile": "ca"}, "client certificate, put certfile and keyfile on the URL",
    ),
    "broker, another CA": (
        "amqp", {"cafile": "other_ca", **CLIENT}, "TLS handshake failed (certificate verify failed",
    ),
    "Postgres, no client certificate": (
        "database", {"sslrootcert": "ca"}, "refused: connection requires a valid client certificate",
    ),
    "Postgres, another CA": (
        "database", {"sslrootcert": "other_ca", **DB_CLIENT}, "certificate verify failed",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_a_client_without_the_right_certificates_is_refused_with_one_line(
    servers: TlsServers, case: str
) -> None:
    side, files, says = REFUSED[case]
    paths = {param: getattr(servers.certs, name) for param, name in files.items()}
    amqp_url = servers.amqp_url(**paths) if side == "amqp" else servers.good_amqp_url
    database_url = servers.database_url(**paths) if side == "database" else servers.good_database_url
    command = ("topology", "apply") if side == "amqp" else ("db", "migrate")

    code, err = await detfleet(
        *command, amqp_url=amqp_url, database_url=database_url, management_url=servers.rabbit.management_url
    )

    assert code == 1, err
    [line] = err.splitlines()
    assert line.startswith("detfleet "), line
    assert says in line, line
