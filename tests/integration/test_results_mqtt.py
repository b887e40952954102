"""Result events over MQTT, as line equipment (a PLC, Node-RED) takes them: RabbitMQ's MQTT plugin.

A private node (its own ports; this machine's 1883 is another broker's) runs ``rabbitmq_mqtt`` with
``mqtt.exchange = detfleet.results``, so an MQTT topic is a routing key with ``/`` for ``.``: a client
subscribed to ``failed/+/+`` gets the failures of every site and camera. It logs in as
``detfleet-subscriber`` with the permissions of ``shared.topology.USERS``: the role is enough for MQTT too.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from shared import admin
from shared.broker.aio import Broker
from shared.events import ResultEvent
from shared.management import Management
from shared.settings import AdminSettings
from shared.topology import EXCHANGE_RESULTS, USERS
from tests.chaos.nodes import LOOPBACK, MqttRabbit, NodeError
from tests.integration.results_support import BOUND_S, collect, make_event, publish_events

SUBSCRIBER = next(u for u in USERS if u.name == "detfleet-subscriber")
PASSWORD = "mqtt-test-password"
MOSQUITTO_SUB = "/usr/bin/mosquitto_sub"  # Debian's mosquitto-clients


@pytest.fixture
def node(tmp_path: Path) -> Iterator[MqttRabbit]:
    rabbit = MqttRabbit(tmp_path / "rabbit", EXCHANGE_RESULTS)
    try:
        rabbit.start()
        yield rabbit
    finally:
        try:
            rabbit.stop()
        except NodeError:
            rabbit.kill()


@dataclass
class MqttSubscriber:
    """paho runs its network loop in a thread of its own; what it receives is handed to our loop."""

    loop: asyncio.AbstractEventLoop
    received: asyncio.Queue[mqtt.MQTTMessage] = field(default_factory=asyncio.Queue)
    subscribed: threading.Event = field(default_factory=threading.Event)
    refused: list[str] = field(default_factory=list)

    def on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.loop.call_soon_threadsafe(self.received.put_nowait, message)

    def on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: list[ReasonCode], properties: Any
    ) -> None:
        self.refused += [str(code) for code in codes if code.is_failure]
        self.subscribed.set()


def mqtt_client(node: MqttRabbit, subscriber: MqttSubscriber) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="line-7-plc", protocol=mqtt.MQTTv311)
    client.username_pw_set(SUBSCRIBER.name, PASSWORD)
    client.on_message = subscriber.on_message
    client.on_subscribe = subscriber.on_subscribe
    client.connect(LOOPBACK, node.mqtt_port, keepalive=30)
    return client


async def test_an_mqtt_client_subscribed_to_failed_gets_only_the_failures_with_their_json(
    node: MqttRabbit,
) -> None:
    settings = AdminSettings(amqp_url=node.amqp_url, management_url=node.management_url)
    await admin.apply_topology(settings)
    async with Management(node.management_url) as api:
        await api.put_user(SUBSCRIBER, PASSWORD)
        await api.grant("/", SUBSCRIBER.name, SUBSCRIBER.configure, SUBSCRIBER.write, SUBSCRIBER.read)

    subscriber = MqttSubscriber(asyncio.get_running_loop())
    client = mqtt_client(node, subscriber)
    client.loop_start()
    broker = await Broker.connect(node.amqp_url, "test:mqtt")
    # The command docs/results.md gives, for one site: it exits after the two failures of line-1.
    line_1 = await start_mosquitto_sub(node, "failed/line-1/+", count=2)
    try:
        client.subscribe("failed/+/+", qos=1)
        assert await asyncio.to_thread(subscriber.subscribed.wait, BOUND_S)
        assert subscriber.refused == []
        await wait_for_suback(line_1)
        everything, catch_all = await collect(broker, EXCHANGE_RESULTS, ["#"])  # keeps every publish routable
        events = [
            make_event("ok", camera="cam-1"),
            make_event("failed", camera="cam-1", reason="inference failed: CUDA out of memory"),
            make_event("shed", site="line-2", camera="cam-4"),
            make_event("failed", site="line-2", camera="cam-4"),
            make_event("ok", site="line-2", camera="cam-4"),
            make_event("failed", camera="cam-9"),
        ]
        await publish_events(broker, events)
        failed = [e for e in events if e.status == "failed"]
        messages = [await asyncio.wait_for(subscriber.received.get(), BOUND_S) for _ in failed]
        await everything.wait_for(len(events))  # every event was published and routed
        await catch_all.close()
        out, _ = await asyncio.wait_for(line_1.communicate(), BOUND_S)
    finally:
        client.loop_stop()
        client.disconnect()
        await broker.close()
        if line_1.returncode is None:
            line_1.kill()
            await line_1.wait()
    assert [m.topic for m in messages] == [f"failed/{e.site}/{e.camera_id}" for e in failed]
    assert [ResultEvent.from_json(bytes(m.payload)) for m in messages] == failed
    assert subscriber.received.empty()  # the ok and shed events went elsewhere
    assert line_1.returncode == 0
    printed = [line.split(" ", 1) for line in out.decode().splitlines() if line.startswith("failed/")]
    assert [(topic, ResultEvent.from_json(body.encode())) for topic, body in printed] == [
        (f"failed/line-1/{e.camera_id}", e) for e in failed if e.site == "line-1"
    ]


async def start_mosquitto_sub(node: MqttRabbit, topic: str, count: int) -> asyncio.subprocess.Process:
    """``mosquitto_sub -d``: its debug lines say when the subscription is acknowledged (line-buffered: into a
    pipe they would wait in its stdio buffer)."""
    return await asyncio.create_subprocess_exec(
        "stdbuf", "-oL", MOSQUITTO_SUB,
        "-h", LOOPBACK, "-p", str(node.mqtt_port), "-u", SUBSCRIBER.name, "-P", PASSWORD,
        "-i", "line-1-board", "-q", "1", "-t", topic, "-v", "-d", "-C", str(count),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


async def wait_for_suback(process: asyncio.subprocess.Process) -> None:
    assert process.stdout is not None
    while b"SUBACK" not in (line := await asyncio.wait_for(process.stdout.readline(), BOUND_S)):
        assert line, "mosquitto_sub exited before subscribing"
