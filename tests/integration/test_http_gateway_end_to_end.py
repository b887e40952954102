"""End to end through the HTTP gateway: a real frame POSTed, a real consumer (the shipped detector) writes its
row, GET returns its detections, and the WebSocket and SSE streams deliver the same result (the event the
consumer published for the row)."""

from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp
import pytest

from consumer.detector import DetectorConfig, load_detector
from shared.events import ResultEvent
from shared.settings import AdminSettings, shipped_model_path
from tests.integration.consumer_support import consumer_settings, run_until_idle
from tests.integration.http_gateway_support import READER_TOKEN, bearer, gateway_settings, scene_jpeg, serving

SITE, CAMERA = "line-1", "cam-3"
STREAM_LIMIT_S = 60.0  # bound against a hang


async def next_sse_event(content: aiohttp.StreamReader) -> ResultEvent:
    while True:
        line = await content.readline()
        if line.startswith(b"data: "):
            return ResultEvent.model_validate(json.loads(line.removeprefix(b"data: ")))


@pytest.mark.timeout(180)
async def test_post_get_and_both_streams_agree_on_a_real_frame(
    topology_settings: AdminSettings, results_db: str
) -> None:
    detector = load_detector(DetectorConfig(model_path=shipped_model_path(), device="cpu"))
    filters = f"site={SITE}&camera={CAMERA}&access_token={READER_TOKEN}"
    async with (
        serving(gateway_settings(topology_settings.amqp_url, results_db)) as http,
        aiohttp.ClientSession(http.url) as client,
        client.ws_connect(f"/v1/results?{filters}") as socket,
        client.get(f"/v1/results/sse?{filters}") as sse,
    ):
        assert await asyncio.wait_for(sse.content.readline(), STREAM_LIMIT_S) == b": connected\n"
        async with client.post(
            f"/v1/frames?site={SITE}&camera={CAMERA}",
            data=scene_jpeg(seed=7),
            headers={"Content-Type": "image/jpeg", **bearer()},
        ) as response:
            assert response.status == 202
            location = response.headers["Location"]
        task_id = uuid.UUID(location.rsplit("/", 1)[1])

        await run_until_idle(consumer_settings(topology_settings, results_db), detector)

        async with client.get(location, headers=bearer(READER_TOKEN)) as answer:
            assert answer.status == 200
            result = await answer.json()
        pushed = ResultEvent.model_validate(await socket.receive_json(timeout=STREAM_LIMIT_S))
        streamed = await asyncio.wait_for(next_sse_event(sse.content), STREAM_LIMIT_S)

    assert result["status"] == "ok"
    assert result["detections"], "a generated line frame carries objects the shipped detector finds"
    assert result["model_name"] == shipped_model_path().name
    assert pushed == streamed
    assert pushed.task_id == task_id
    assert (pushed.status, pushed.site, pushed.camera_id) == ("ok", SITE, CAMERA)
    assert pushed.detections == result["detections"]
    assert pushed.model_sha256 == result["model_sha256"]
