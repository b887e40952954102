"""The HTTP gateway against the real broker and Postgres: frames in, results out, every status code from the
case that should produce it."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiohttp
import asyncpg
import pytest

from consumer.detector.fake import FakeDetector
from producer.http.auth import hash_token
from shared.broker.aio import Broker
from shared.errors import UnroutableError
from shared.events import ResultEvent
from shared.frames import MAX_FRAME_BYTES
from shared.management import Management
from shared.schema import frame_task_id
from shared.settings import AdminSettings
from shared.topology import EXCHANGE_RESULTS, QUEUE_BULK
from tests.integration.consumer_support import consumer_settings, run_until_idle
from tests.integration.http_gateway_support import (
    CAMERA_TOKEN,
    READER_TOKEN,
    RunningGateway,
    bearer,
    gateway_settings,
    serving,
)
from tests.support.broker import override_policy, read_all, wait_until
from tests.support.frames import jpeg_bytes, png_bytes, png_header_only

SITE, CAMERA = "site-a", "cam-1"
STREAM_LIMIT_S = 30.0  # bound against a hang


@pytest.fixture
async def http(topology_settings: AdminSettings, results_db: str) -> AsyncIterator[RunningGateway]:
    async with serving(gateway_settings(topology_settings.amqp_url, results_db)) as running:
        yield running


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def frames_url(http: RunningGateway, site: str = SITE, camera: str = CAMERA, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"site": site, "camera": camera, **params}.items())
    return f"{http.url}/v1/frames?{query}"


async def post_jpeg(
    client: aiohttp.ClientSession, http: RunningGateway, body: bytes, token: str | None = None, **params: str
) -> aiohttp.ClientResponse:
    headers = {"Content-Type": "image/jpeg", **(bearer(token) if token else bearer())}
    async with client.post(frames_url(http, **params), data=body, headers=headers) as response:
        await response.read()
        return response


async def test_a_posted_frame_is_pending_then_its_row_answers_get(
    http: RunningGateway, client: aiohttp.ClientSession, topology_settings: AdminSettings, results_db: str
) -> None:
    frame = jpeg_bytes(320, 240, seed=3)
    async with client.post(
        frames_url(http, trace_id="trace-http-1"),
        data=frame,
        headers={"Content-Type": "image/jpeg", **bearer()},
    ) as response:
        assert response.status == 202
        answer = await response.json()
        location = response.headers["Location"]
    task_id = uuid.UUID(answer["task_id"])
    assert location == f"/v1/tasks/{task_id}"
    # The content hash names the frame: the same image again is the same task.
    assert task_id == frame_task_id(SITE, CAMERA, "sha256:" + hashlib.sha256(frame).hexdigest())
    again = await post_jpeg(client, http, frame)
    assert again.headers["Location"] == location

    async with client.get(http.url + location, headers=bearer(READER_TOKEN)) as response:
        assert response.status == 202
        assert (await response.json())["state"] == "pending"

    await run_until_idle(consumer_settings(topology_settings, results_db), FakeDetector())

    async with client.get(http.url + location, headers=bearer(READER_TOKEN)) as response:
        assert response.status == 200
        result = await response.json()
    assert result["status"] == "ok"
    assert result["trace_id"] == "trace-http-1"
    assert result["detections"], "the fake detector finds something in every frame"
    assert result["model_name"]
    assert set(result["timings"]) >= {"queue_wait_ms", "inference_ms", "end_to_end_ms"}


async def test_multipart_and_png_and_headers_are_accepted(
    http: RunningGateway, client: aiohttp.ClientSession
) -> None:
    form = aiohttp.FormData()
    form.add_field("frame", jpeg_bytes(seed=4), filename="f.jpg", content_type="image/jpeg")
    async with client.post(frames_url(http), data=form, headers=bearer()) as response:
        assert response.status == 202
    headers = {"Content-Type": "image/png", "X-Detfleet-Site": SITE, "X-Detfleet-Camera": "cam-2", **bearer()}
    headers["X-Detfleet-Lane"] = "realtime"
    async with client.post(f"{http.url}/v1/frames", data=png_bytes(seed=5), headers=headers) as response:
        assert response.status == 202


async def test_a_client_frame_id_names_the_task(http: RunningGateway, client: aiohttp.ClientSession) -> None:
    first = await post_jpeg(client, http, jpeg_bytes(seed=13), frame_id="seq-42")
    second = await post_jpeg(client, http, jpeg_bytes(seed=14), frame_id="seq-42")
    expected = f"/v1/tasks/{frame_task_id(SITE, CAMERA, 'id:seq-42')}"
    assert first.headers["Location"] == second.headers["Location"] == expected


async def test_a_shed_realtime_frame_says_so(
    http: RunningGateway, client: aiohttp.ClientSession, results_db: str
) -> None:
    response = await post_jpeg(client, http, jpeg_bytes(seed=6), lane="realtime")
    location = response.headers["Location"]
    task_id = uuid.UUID(location.rsplit("/", 1)[1])
    # The row a consumer writes for a realtime frame the broker expired (docs/reliability.md).
    conn = await asyncpg.connect(results_db)
    try:
        await conn.execute(
            "INSERT INTO detfleet_results (task_id, site, camera_id, lane, received_at, completed_at, status,"
            " reason, consumer_id) VALUES ($1, $2, $3, 'realtime', now(), now(), 'shed', 'expired', 'test')",
            task_id,
            SITE,
            CAMERA,
        )
    finally:
        await conn.close()
    async with client.get(http.url + location, headers=bearer()) as answer:
        assert answer.status == 200
        body = await answer.json()
    assert (body["status"], body["reason"]) == ("shed", "expired")


async def test_unknown_task_is_404_and_a_bad_id_422(
    http: RunningGateway, client: aiohttp.ClientSession
) -> None:
    async with client.get(f"{http.url}/v1/tasks/{uuid.uuid4()}", headers=bearer()) as response:
        assert response.status == 404
    async with client.get(f"{http.url}/v1/tasks/not-a-uuid", headers=bearer()) as response:
        assert response.status == 422
        assert "task_id" in (await response.json())["detail"]


async def test_tokens_and_scopes(http: RunningGateway, client: aiohttp.ClientSession) -> None:
    frame = jpeg_bytes(seed=7)
    async with client.post(frames_url(http), data=frame, headers={"Content-Type": "image/jpeg"}) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert (await post_jpeg(client, http, frame, token="not-a-token")).status == 401
    assert (await post_jpeg(client, http, frame, token=CAMERA_TOKEN)).status == 202
    assert (await post_jpeg(client, http, frame, token=CAMERA_TOKEN, camera="other")).status == 403
    assert (await post_jpeg(client, http, frame, token=READER_TOKEN)).status == 403
    async with client.get(f"{http.url}/v1/tasks/{uuid.uuid4()}", headers=bearer(CAMERA_TOKEN)) as response:
        assert response.status == 403
    async with client.get(f"{http.url}/v1/tasks/{uuid.uuid4()}?access_token={READER_TOKEN}") as response:
        assert response.status == 404


async def test_bad_input_gets_413_415_422(http: RunningGateway, client: aiohttp.ClientSession) -> None:
    oversized = io.BytesIO(b"\xff\xd8\xff" + b"\0" * MAX_FRAME_BYTES)
    async with client.post(
        frames_url(http), data=oversized, headers={"Content-Type": "image/jpeg", **bearer()}
    ) as r:
        assert r.status == 413
    headers = {"Content-Type": "image/png", **bearer()}
    async with client.post(
        frames_url(http), data=png_header_only(10_000, 10_000), headers=headers
    ) as response:
        assert response.status == 413
        assert "megapixel" in (await response.json())["detail"]
    async with client.post(frames_url(http), data=b"GIF89a....", headers=headers) as response:
        assert response.status == 415
    async with client.post(
        frames_url(http), data=b"x", headers={"Content-Type": "text/plain", **bearer()}
    ) as r:
        assert r.status == 415
    expectations = {
        "site": {"site": "a.b"},
        "lane": {"lane": "urgent"},
        "captured_at": {"captured_at": "2026-11-23T08:00:00"},
        # Past its deadline already: it would only be shed, so it is refused (sending again cannot help).
        "realtime captured_at": {"lane": "realtime", "captured_at": "2000-01-01T00:00:00Z"},
    }
    for field, params in expectations.items():
        response = await post_jpeg(client, http, jpeg_bytes(seed=8), **params)
        assert response.status == 422, field
    async with client.post(
        f"{http.url}/v1/frames?site={SITE}",
        data=jpeg_bytes(),
        headers={"Content-Type": "image/jpeg", **bearer()},
    ) as response:
        assert response.status == 422
        assert "camera" in (await response.json())["detail"]
    truncated = jpeg_bytes()[:40]
    async with client.post(
        frames_url(http), data=truncated, headers={"Content-Type": "image/jpeg", **bearer()}
    ) as r:
        assert r.status == 422
        assert "JPEG" in (await r.json())["detail"]


async def test_over_the_rate_is_429_with_retry_after(
    topology_settings: AdminSettings, results_db: str, client: aiohttp.ClientSession
) -> None:
    settings = gateway_settings(topology_settings.amqp_url, results_db, gateway_rate=0.01, gateway_burst=2)
    async with serving(settings) as http:
        codes = [(await post_jpeg(client, http, jpeg_bytes(seed=i))).status for i in range(3)]
        assert codes == [202, 202, 429]
        refused = await post_jpeg(client, http, jpeg_bytes(seed=9))
        assert int(refused.headers["Retry-After"]) >= 1


async def test_a_full_bulk_lane_is_503_with_retry_after(
    topology_settings: AdminSettings,
    results_db: str,
    client: aiohttp.ClientSession,
    management: Management,
    broker: Broker,
) -> None:
    await override_policy(management, topology_settings, QUEUE_BULK, **{"max-length": 1})
    settings = gateway_settings(topology_settings.amqp_url, results_db, nack_retries=0)
    async with serving(settings) as http:
        assert (await post_jpeg(client, http, jpeg_bytes(seed=10))).status == 202
        refused = await post_jpeg(client, http, jpeg_bytes(seed=11))
        assert refused.status == 503
        assert refused.headers["Retry-After"] == str(settings.gateway_retry_after_s)
    assert len(await read_all(broker, QUEUE_BULK)) == 1  # only the frame answered 202


def event_for(site: str, camera: str, status: str = "ok") -> ResultEvent:
    return ResultEvent(
        task_id=uuid.uuid4(),
        status=status,
        site=site,
        camera_id=camera,
        lane="bulk",
        completed_at=datetime.now(UTC),
        detections=[{"class_id": 0, "label": "part", "score": 0.9, "box": [1, 2, 30, 40]}],
        model_name="test.onnx",
    )


async def publish_event(broker: Broker, event: ResultEvent) -> bool:
    """Publish as the consumer will; False when no stream's binding matched it (returned, mandatory)."""
    try:
        await broker.publish(event.to_envelope(), EXCHANGE_RESULTS)
    except UnroutableError:
        return False
    return True


async def test_the_websocket_delivers_matching_events_only(
    http: RunningGateway, client: aiohttp.ClientSession, broker: Broker
) -> None:
    url = f"{http.ws_url}/v1/results?site={SITE}&camera={CAMERA}&access_token={READER_TOKEN}"
    async with client.ws_connect(url) as socket:
        assert open_streams(http, "websocket") == 1
        other = event_for(SITE, "cam-9")
        wanted = event_for(SITE, CAMERA)
        assert not await publish_event(broker, other)
        assert await publish_event(broker, wanted)
        message = await socket.receive_json(timeout=STREAM_LIMIT_S)
    assert ResultEvent.model_validate(message) == wanted
    # The client went: its stream (and the queue bound for it) is closed.
    await wait_until(lambda: open_streams(http, "websocket") == 0, STREAM_LIMIT_S)


def open_streams(http: RunningGateway, kind: str) -> float:
    value: float = http.gateway.metrics.streams.labels(kind)._value.get()
    return value


async def test_a_websocket_without_a_token_is_refused(
    http: RunningGateway, client: aiohttp.ClientSession
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with client.ws_connect(f"{http.ws_url}/v1/results"):
            pass
    assert refused.value.status == 401


async def next_event(content: aiohttp.StreamReader) -> list[bytes]:
    """The lines of the next SSE event (comments and the blank lines between events skipped)."""
    lines: list[bytes] = []
    while True:
        line = await content.readline()
        if line == b"\n" and lines:
            return lines
        if line != b"\n" and not line.startswith(b":"):
            lines.append(line)


async def test_server_sent_events_deliver_matching_events(
    http: RunningGateway, client: aiohttp.ClientSession, broker: Broker
) -> None:
    url = f"{http.url}/v1/results/sse?status=failed&site={SITE}"
    async with client.get(url, headers=bearer(READER_TOKEN)) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert await asyncio.wait_for(response.content.readline(), STREAM_LIMIT_S) == b": connected\n"
        assert not await publish_event(broker, event_for(SITE, CAMERA, "ok"))
        failed = event_for(SITE, CAMERA, "failed")
        assert await publish_event(broker, failed)
        lines = await asyncio.wait_for(next_event(response.content), STREAM_LIMIT_S)
        assert open_streams(http, "sse") == 1
    # The client went: the gateway notices and closes the stream and its queue.
    await wait_until(lambda: open_streams(http, "sse") == 0, STREAM_LIMIT_S)
    assert lines[0] == b"event: result\n"
    assert lines[1] == f"id: {failed.task_id}\n".encode()
    assert ResultEvent.model_validate(json.loads(lines[2].removeprefix(b"data: "))) == failed


async def test_health_and_metrics(http: RunningGateway, client: aiohttp.ClientSession) -> None:
    async with client.get(f"{http.url}/livez") as response:
        assert response.status == 200
    async with client.get(f"{http.url}/readyz") as response:
        assert response.status == 200, await response.text()
    assert (await post_jpeg(client, http, jpeg_bytes(seed=12))).status == 202
    async with client.get(f"{http.url}/metrics") as response:
        text = await response.text()
    assert 'detfleet_gateway_requests_total{method="POST",route="/v1/frames",status="202"} 1.0' in text
    assert 'detfleet_gateway_frames_accepted_total{lane="bulk"} 1.0' in text
    assert "detfleet_gateway_publish_seconds_count 1.0" in text
    assert "detfleet_gateway_result_streams" in text
    assert 'detfleet_confirmed_total{lane="bulk"} 1.0' in text


def test_the_stored_hash_is_the_sha256_of_the_token() -> None:
    assert hash_token("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
