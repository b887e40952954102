"""``detfleet results forward --webhook`` against a local HTTP endpoint, on the real broker.

The endpoint (aiohttp, in the test's loop) verifies every signature, fails the first POSTs of each event
as it is told, and records what it accepted and how many POSTs of one camera it had in flight at once.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from detfleet.webhook import H_EVENT_ID, H_PARK_ATTEMPTS, H_SIGNATURE, H_TIMESTAMP, verify
from shared.broker.aio import Broker
from shared.events import ResultEvent
from shared.schema import H_REASON
from shared.settings import AdminSettings
from shared.topology import parked_queue, webhook_queue
from tests.integration.results_support import (
    BOUND_S,
    cli_env,
    collect,
    make_event,
    publish_events,
    start_cli,
    wait_until_subscribed,
)

SECRET = "line-7-webhook-secret"


@dataclass
class Endpoint:
    """A webhook receiver: 503 for the first ``fail_first`` POSTs of each event, then 200, or the status
    ``always`` gives the event's camera."""

    fail_first: int = 0
    always: dict[str, int] = field(default_factory=dict)
    url: str = ""
    posts: Counter[uuid.UUID] = field(default_factory=Counter)
    accepted: dict[str, list[uuid.UUID]] = field(default_factory=lambda: defaultdict(list))
    unverified: list[uuid.UUID] = field(default_factory=list)
    in_flight: Counter[str] = field(default_factory=Counter)
    most_in_flight: Counter[str] = field(default_factory=Counter)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        event = ResultEvent.from_json(body)
        camera = event.camera_id or "?"
        self.in_flight[camera] += 1
        self.most_in_flight[camera] = max(self.most_in_flight[camera], self.in_flight[camera])
        try:
            signed = verify(SECRET.encode(), request.headers[H_TIMESTAMP], body, request.headers[H_SIGNATURE])
            if not signed or request.headers[H_EVENT_ID] != str(event.task_id):
                self.unverified.append(event.task_id)
            self.posts[event.task_id] += 1
            await asyncio.sleep(0)  # a turn for any other POST of this camera, were one in flight
            status = 503 if self.posts[event.task_id] <= self.fail_first else self.always.get(camera, 200)
            if status == 200:
                self.accepted[camera].append(event.task_id)
            return web.Response(status=status, text="busy, try later" if status == 503 else "")
        finally:
            self.in_flight[camera] -= 1
            self._changed.set()

    async def wait_for(self, accepted: int) -> None:
        await self._wait_until(lambda: sum(len(ids) for ids in self.accepted.values()) >= accepted)

    async def wait_for_posts(self, task_id: uuid.UUID, posts: int) -> None:
        await self._wait_until(lambda: self.posts[task_id] >= posts)

    async def _wait_until(self, condition: Callable[[], bool]) -> None:
        async def reached() -> None:
            while not condition():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(reached(), BOUND_S)


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    receiver = Endpoint()
    app = web.Application()
    app.router.add_post("/hook", receiver.receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    receiver.url = f"http://{host}:{port}/hook"
    yield receiver
    await runner.cleanup()


async def stop(process: asyncio.subprocess.Process) -> tuple[int, str, str]:
    process.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(process.communicate(), BOUND_S)
    return process.returncode or 0, out.decode(), err.decode()


async def test_every_event_arrives_signed_and_in_order_per_camera_despite_503s(
    broker: Broker, topology_settings: AdminSettings, endpoint: Endpoint
) -> None:
    endpoint.fail_first = 2
    env = cli_env(
        topology_settings.amqp_url,
        LINE_WEBHOOK_SECRET=SECRET,
        DETFLEET_WEBHOOK_BACKOFF_S="0.01",
        DETFLEET_WEBHOOK_MAX_BACKOFF_S="0.05",
        DETFLEET_WEBHOOK_PREFETCH="16",
    )
    args = (
        "forward",
        "--webhook",
        endpoint.url,
        "--name",
        "mes",
        "--secret-env",
        "LINE_WEBHOOK_SECRET",
        "--json",
    )
    process = await start_cli(env, *args)
    try:
        await wait_until_subscribed(process)
        cameras = ("cam-1", "cam-2", "cam-3")
        events = [make_event("ok" if n % 3 else "failed", camera=c) for n in range(4) for c in cameras]
        await publish_events(broker, events)
        await endpoint.wait_for(len(events))
        code, out, err = await stop(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == 0, err
    assert json.loads(out) == {"delivered": 12, "parked": 0, "retries": 24}
    for camera in cameras:
        assert endpoint.accepted[camera] == [e.task_id for e in events if e.camera_id == camera]
        assert endpoint.most_in_flight[camera] == 1
    assert set(endpoint.posts.values()) == {3}  # two 503s, then taken
    assert endpoint.unverified == []
    queue = webhook_queue("mes")
    assert await broker.queue_depth(queue) == 0
    assert await broker.queue_depth(parked_queue(queue)) == 0


async def test_an_event_the_endpoint_refuses_or_never_takes_is_parked_with_its_reason(
    broker: Broker, topology_settings: AdminSettings, endpoint: Endpoint
) -> None:
    endpoint.fail_first = 1
    endpoint.always = {"cam-bad": 400, "cam-down": 500}
    env = cli_env(
        topology_settings.amqp_url,
        DETFLEET_WEBHOOK_SECRET=SECRET,
        DETFLEET_WEBHOOK_MAX_ATTEMPTS="3",
        DETFLEET_WEBHOOK_BACKOFF_S="0.01",
        DETFLEET_WEBHOOK_MAX_BACKOFF_S="0.05",
    )
    queue = webhook_queue("plc")
    process = await start_cli(env, "forward", "--webhook", endpoint.url, "--name", "plc")
    try:
        await wait_until_subscribed(process)  # the parking lot is declared by now
        parked, watching = await collect(broker, parked_queue(queue), [""])
        good = [make_event("ok", camera="cam-ok") for _ in range(2)]
        refused = make_event("failed", camera="cam-bad")
        down = make_event("ok", camera="cam-down")
        await publish_events(broker, [good[0], refused, down, good[1]])
        copies = await parked.wait_for(2)
        await endpoint.wait_for(len(good))
        code, out, err = await stop(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    await watching.close()
    assert code == 0, err
    assert out.split() == ["delivered", "2", "parked", "2", "retries", "2"]
    assert endpoint.accepted["cam-ok"] == [e.task_id for e in good]
    assert endpoint.posts[refused.task_id] == 2  # a 503, then a 400: never tried again
    assert endpoint.posts[down.task_id] == 3
    assert {e.task_id for e in copies} == {refused.task_id, down.task_id}
    # The parking queue itself holds both, with the reason and the tries, bodies untouched.
    async with broker.reading(parked_queue(queue)) as reader:
        entries = [await reader.get() for _ in range(2)]
    by_id = {uuid.UUID(str(e.envelope.message_id)): e.envelope for e in entries if e is not None}
    assert ResultEvent.from_json(by_id[refused.task_id].body) == refused
    assert ResultEvent.from_json(by_id[down.task_id].body) == down
    assert str(by_id[refused.task_id].headers[H_REASON]).startswith("HTTP 400")
    assert by_id[refused.task_id].headers[H_PARK_ATTEMPTS] == 2
    assert str(by_id[down.task_id].headers[H_REASON]).startswith("gave up after 3 tries: HTTP 500")
    assert by_id[down.task_id].headers[H_PARK_ATTEMPTS] == 3
    assert by_id[down.task_id].routing_key == down.routing_key
    assert await broker.queue_depth(queue) == 0


async def test_a_stop_while_an_event_is_being_retried_leaves_it_queued_for_the_next_run(
    broker: Broker, topology_settings: AdminSettings, endpoint: Endpoint
) -> None:
    """Acked only once delivered or parked: SIGTERM between two tries hands the event back, and the next
    forwarder of the same name delivers it."""
    endpoint.always = {"cam-1": 503}
    env = cli_env(
        topology_settings.amqp_url,
        DETFLEET_WEBHOOK_SECRET=SECRET,
        DETFLEET_WEBHOOK_MAX_ATTEMPTS="1000",
        DETFLEET_WEBHOOK_BACKOFF_S="0.01",
        DETFLEET_WEBHOOK_MAX_BACKOFF_S="0.05",
    )
    args = ("forward", "--webhook", endpoint.url, "--name", "mes", "--json")
    event = make_event("failed", camera="cam-1")
    first = await start_cli(env, *args)
    try:
        await wait_until_subscribed(first)
        await publish_events(broker, [event])
        await endpoint.wait_for_posts(event.task_id, 2)  # being retried now
        code, out, err = await stop(first)
    finally:
        if first.returncode is None:
            first.kill()
            await first.wait()
    assert code == 0, err
    assert json.loads(out) == {"delivered": 0, "parked": 0, "retries": 0}
    queue = webhook_queue("mes")
    assert await broker.queue_depth(parked_queue(queue)) == 0  # not parked: handed back, unacked

    endpoint.always = {}  # the endpoint is back
    second = await start_cli(env, *args)
    try:
        await wait_until_subscribed(second)
        await endpoint.wait_for(1)
        code, out, err = await stop(second)
    finally:
        if second.returncode is None:
            second.kill()
            await second.wait()
    assert code == 0, err
    assert json.loads(out) == {"delivered": 1, "parked": 0, "retries": 0}
    assert endpoint.accepted["cam-1"] == [event.task_id]
    assert await broker.queue_depth(queue) == 0
