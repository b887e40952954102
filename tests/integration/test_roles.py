"""Least privilege, on the booted stack: each role may do what it needs, and what it may not is refused.

The broker users and the database roles are those the compose set-up created (tests/support/compose_stack.py):
the same definitions, bootstrap and migrations a deployment runs. A refusal is the broker's 403
(ACCESS_REFUSED) or Postgres' insufficient_privilege, never a missing object.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import pika
import pika.exceptions
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from shared.errors import ManagementError
from shared.management import Management
from tests.support.compose_stack import ComposeBoot

pytestmark = pytest.mark.integration

PASSWORDS = {
    "detfleet-producer": "PRODUCER_PASSWORD",
    "detfleet-consumer": "CONSUMER_PASSWORD",
    "detfleet-ops": "OPS_PASSWORD",
    "detfleet-monitoring": "MONITORING_PASSWORD",
    "detfleet-subscriber": "SUBSCRIBER_PASSWORD",
    "detfleet-gateway": "GATEWAY_PASSWORD",
}
STATS_LIMIT_S = 60  # the management API refreshes queue figures every few seconds; a bound, not a timing


@pytest.fixture(scope="module")
def stack() -> Iterator[ComposeBoot]:
    with ComposeBoot() as booted:
        yield booted


Operation = Callable[[BlockingChannel], Any]


def publish_to(exchange: str, routing_key: str = "bulk.site.cam") -> Operation:
    def publish(channel: BlockingChannel) -> None:
        channel.confirm_delivery()
        channel.basic_publish(exchange, routing_key, b"role test", pika.BasicProperties(delivery_mode=2))

    return publish


def get_from(queue: str) -> Operation:
    def get(channel: BlockingChannel) -> None:
        method, _, _ = channel.basic_get(queue, auto_ack=False)
        if method is not None:
            channel.basic_nack(method.delivery_tag, requeue=True)

    return get


def subscribe_to(exchange: str) -> Operation:
    """What a live stream does: a server-named exclusive queue bound to ``exchange`` and consumed."""

    def subscribe(channel: BlockingChannel) -> None:
        queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        channel.queue_bind(queue, exchange, "ok.*.*")
        channel.basic_consume(queue, lambda *_: None)

    return subscribe


def purge(queue: str) -> Operation:
    return lambda channel: channel.queue_purge(queue)


def declare_queue(queue: str) -> Operation:
    return lambda channel: channel.queue_declare(queue, durable=True)


def delete_queue(queue: str) -> Operation:
    return lambda channel: channel.queue_delete(queue)


def bind_temporary_queue(exchange: str, key: str) -> Operation:
    """What ``detfleet results --follow`` does: a server-named queue bound to ``exchange``, then consumed."""

    def bind(channel: BlockingChannel) -> None:
        queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        channel.queue_bind(queue, exchange, key)
        channel.basic_get(queue, auto_ack=True)

    return bind


def bind_named_queue(queue: str, exchange: str) -> Operation:
    """What the webhook forwarder does: its durable queue bound to the results exchange, then read."""

    def bind(channel: BlockingChannel) -> None:
        channel.queue_declare(queue, durable=True)
        channel.queue_bind(queue, exchange, "#")
        channel.basic_get(queue, auto_ack=False)

    return bind


def declare_parking_lot(name: str) -> Operation:
    """The forwarder's parking lot: a fanout exchange into a queue of the same name, published to."""

    def declare(channel: BlockingChannel) -> None:
        channel.exchange_declare(name, "fanout", durable=True)
        channel.queue_declare(name, durable=True)
        channel.queue_bind(name, name)
        publish_to(name, "failed.site.cam")(channel)

    return declare


def outcome(stack: ComposeBoot, user: str, operation: Operation) -> str:
    """``allowed`` or ``refused``: one operation on a channel of its own, as ``user``."""
    parameters = pika.URLParameters(stack.role_amqp_url(user, PASSWORDS[user]))
    connection = pika.BlockingConnection(parameters)
    try:
        operation(connection.channel())
        return "allowed"
    except pika.exceptions.ChannelClosedByBroker as error:
        return "refused" if error.reply_code == 403 else f"closed with {error.reply_code}: {error}"
    finally:
        if connection.is_open:
            connection.close()


CASES = [
    # The producer publishes frames and nothing else.
    ("detfleet-producer", publish_to("detfleet.frames"), "allowed"),
    ("detfleet-producer", publish_to("detfleet.dlq"), "refused"),
    ("detfleet-producer", publish_to("detfleet.retry.ready"), "refused"),
    ("detfleet-producer", get_from("detfleet.bulk"), "refused"),
    ("detfleet-producer", purge("detfleet.bulk"), "refused"),
    ("detfleet-producer", declare_queue("detfleet.extra"), "refused"),
    # The consumer takes from the lanes, the intake and retry.ready; publishes retries and DLQ entries.
    ("detfleet-consumer", get_from("detfleet.realtime"), "allowed"),
    ("detfleet-consumer", get_from("detfleet.bulk"), "allowed"),
    ("detfleet-consumer", get_from("detfleet.intake"), "allowed"),
    ("detfleet-consumer", get_from("detfleet.retry.ready"), "allowed"),
    ("detfleet-consumer", publish_to("detfleet.retry.1s"), "allowed"),
    ("detfleet-consumer", publish_to("detfleet.retry.ready"), "allowed"),
    ("detfleet-consumer", publish_to("detfleet.dlq"), "allowed"),
    ("detfleet-consumer", publish_to("detfleet.frames"), "refused"),
    ("detfleet-consumer", get_from("detfleet.dlq"), "refused"),
    ("detfleet-consumer", get_from("detfleet.retry.1s"), "refused"),
    ("detfleet-consumer", declare_queue("detfleet.extra"), "refused"),
    ("detfleet-consumer", delete_queue("detfleet.bulk"), "refused"),
    # Operators read the DLQ and replay to the frames exchange; read also means purge, of the DLQ only.
    ("detfleet-ops", get_from("detfleet.dlq"), "allowed"),
    ("detfleet-ops", publish_to("detfleet.frames"), "allowed"),
    ("detfleet-ops", purge("detfleet.dlq"), "allowed"),
    ("detfleet-ops", purge("detfleet.bulk"), "refused"),
    ("detfleet-ops", get_from("detfleet.bulk"), "refused"),
    ("detfleet-ops", publish_to("detfleet.dlq"), "refused"),
    ("detfleet-ops", delete_queue("detfleet.dlq"), "refused"),
    # The HTTP gateway publishes frames and binds a server-named queue per result stream; nothing else.
    ("detfleet-gateway", publish_to("detfleet.frames"), "allowed"),
    ("detfleet-gateway", subscribe_to("detfleet.results"), "allowed"),
    ("detfleet-gateway", publish_to("detfleet.results", "ok.site.cam"), "refused"),
    ("detfleet-gateway", get_from("detfleet.bulk"), "refused"),
    ("detfleet-gateway", purge("detfleet.dlq"), "refused"),
    ("detfleet-gateway", declare_queue("detfleet.extra"), "refused"),
    # Monitoring moves no message at all.
    ("detfleet-monitoring", get_from("detfleet.bulk"), "refused"),
    ("detfleet-monitoring", publish_to("detfleet.frames"), "refused"),
    ("detfleet-monitoring", purge("detfleet.dlq"), "refused"),
    # Subscribers bind queues of their own to the results exchange and read those; nothing else.
    ("detfleet-subscriber", bind_temporary_queue("detfleet.results", "failed.#"), "allowed"),
    ("detfleet-subscriber", bind_named_queue("detfleet.results.webhook.mes", "detfleet.results"), "allowed"),
    ("detfleet-subscriber", declare_parking_lot("detfleet.results.webhook.mes.parked"), "allowed"),
    ("detfleet-subscriber", publish_to("detfleet.results", "failed.site.cam"), "refused"),
    ("detfleet-subscriber", publish_to("detfleet.frames"), "refused"),
    ("detfleet-subscriber", bind_temporary_queue("detfleet.frames", "bulk.#"), "refused"),
    ("detfleet-subscriber", get_from("detfleet.bulk"), "refused"),
    ("detfleet-subscriber", get_from("detfleet.dlq"), "refused"),
    ("detfleet-subscriber", declare_queue("detfleet.extra"), "refused"),
]


@pytest.mark.parametrize(
    ("user", "operation", "expected"),
    CASES,
    ids=[f"{u}-{op.__qualname__.split('.')[0]}-{i}" for i, (u, op, _) in enumerate(CASES)],
)
def test_each_broker_role_may_do_what_it_needs_and_nothing_more(
    stack: ComposeBoot, user: str, operation: Operation, expected: str
) -> None:
    assert outcome(stack, user, operation) == expected


async def test_monitoring_sees_ready_and_unacked_counts_but_cannot_touch_messages(stack: ComposeBoot) -> None:
    """KEDA's http mode reads ``messages`` (ready plus unacked) with the monitoring user's credentials."""
    queue = "detfleet.realtime"
    for _ in range(3):
        assert outcome(stack, "detfleet-producer", publish_to("detfleet.frames", "realtime.s.c")) == "allowed"
    holder = pika.BlockingConnection(
        pika.URLParameters(stack.role_amqp_url("detfleet-consumer", "CONSUMER_PASSWORD"))
    )
    try:
        method, _, _ = holder.channel().basic_get(queue, auto_ack=False)  # held unacked while we look
        assert method is not None
        url = stack.role_management_url("detfleet-monitoring", "MONITORING_PASSWORD")
        async with Management(url) as api:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + STATS_LIMIT_S
            while (figures := await api.queue("/", queue)).get("messages_unacknowledged") != 1:
                assert loop.time() < deadline, figures
                await asyncio.sleep(0.5)
            assert figures["messages"] == figures["messages_ready"] + 1
            with pytest.raises(ManagementError, match="40[13]"):
                await api.request("DELETE", "/queues/%2F/detfleet.dlq/contents")
            with pytest.raises(ManagementError, match="40[13]"):
                await api.request(
                    "POST",
                    f"/queues/%2F/{queue}/get",
                    {"count": 1, "ackmode": "ack_requeue_true", "encoding": "auto"},
                )
            with pytest.raises(ManagementError, match="40[13]"):
                await api.request("PUT", "/queues/%2F/detfleet.extra", {"durable": True})
    finally:
        holder.close()


async def sql_outcome(url: str, statement: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute(statement)
            raise _Rollback
    except _Rollback:
        return "allowed"
    except asyncpg.InsufficientPrivilegeError:
        return "refused"
    finally:
        await conn.close()


class _Rollback(Exception):
    """Leaves the database as it was after an allowed statement."""


ROW = (
    "INSERT INTO {table} (task_id, received_at, completed_at, status, consumer_id) "
    "VALUES (gen_random_uuid(), now(), now(), 'ok', 'roles')"
)
SQL_CASES = [
    ("writer", ROW.format(table="detfleet_results"), "allowed"),
    ("writer", "UPDATE detfleet_results SET redeliveries = redeliveries + 1", "allowed"),
    ("writer", "SELECT count(*) FROM detfleet_results", "allowed"),
    ("writer", "SELECT count(*) FROM detfleet_migrations", "allowed"),
    ("writer", "DELETE FROM detfleet_results", "refused"),
    ("writer", "TRUNCATE detfleet_results", "refused"),
    ("writer", "DROP TABLE detfleet_results", "refused"),
    ("writer", "ALTER TABLE detfleet_results ADD COLUMN extra int", "refused"),
    ("writer", "CREATE TABLE detfleet_extra (id int)", "refused"),
    ("writer", "DELETE FROM detfleet_migrations", "refused"),
    ("reader", "SELECT count(*) FROM detfleet_results", "allowed"),
    ("reader", ROW.format(table="detfleet_results"), "refused"),
    ("reader", "UPDATE detfleet_results SET redeliveries = 0", "refused"),
    ("reader", "DELETE FROM detfleet_results", "refused"),
    ("reader", "CREATE TABLE detfleet_extra (id int)", "refused"),
]


@pytest.mark.parametrize(("role", "statement", "expected"), SQL_CASES)
async def test_each_database_role_may_do_what_it_needs_and_nothing_more(
    stack: ComposeBoot, role: str, statement: str, expected: str
) -> None:
    url = stack.database_url(f"detfleet_{role}", f"DB_{role.upper()}_PASSWORD")
    assert await sql_outcome(url, statement) == expected


async def test_a_table_a_later_migration_adds_is_granted_as_well(stack: ComposeBoot) -> None:
    """Default privileges: a table the migrating role creates after 0004 needs no grant of its own."""
    admin = await asyncpg.connect(stack.database_url("postgres", None))
    try:
        await admin.execute("CREATE TABLE detfleet_later (task_id uuid PRIMARY KEY, starts int NOT NULL)")
    finally:
        await admin.close()
    writer = stack.database_url("detfleet_writer", "DB_WRITER_PASSWORD")
    reader = stack.database_url("detfleet_reader", "DB_READER_PASSWORD")
    insert = "INSERT INTO detfleet_later VALUES (gen_random_uuid(), 1)"
    assert await sql_outcome(writer, insert) == "allowed"
    assert await sql_outcome(writer, "DELETE FROM detfleet_later") == "refused"
    assert await sql_outcome(reader, "SELECT * FROM detfleet_later") == "allowed"
    assert await sql_outcome(reader, insert) == "refused"


async def test_a_wrong_database_password_is_refused(stack: ComposeBoot) -> None:
    url = stack.database_url("detfleet_writer", "DB_READER_PASSWORD")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(url)
