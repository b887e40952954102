"""The HTTP gateway when the broker blocks (a memory alarm's effect: it stops reading) or the database is
away: 503 with Retry-After where an answer would be a guess, and never a 202 for an unconfirmed frame."""

from __future__ import annotations

import aiohttp

from shared.settings import AdminSettings
from tests.chaos.nodes import free_port
from tests.integration.http_gateway_support import bearer, gateway_settings, serving
from tests.support.broker import wait_until
from tests.support.frames import jpeg_bytes
from tests.support.proxy import TcpProxy

FRAMES = "/v1/frames?site=site-a&camera=cam-1"
JPEG = {"Content-Type": "image/jpeg", **bearer()}


async def test_a_blocked_broker_gives_503_and_the_frame_is_resent_safely(
    topology_settings: AdminSettings, results_db: str
) -> None:
    async with TcpProxy(port=5672) as proxy:
        amqp_url = proxy.amqp_url(topology_settings.amqp_url)
        settings = gateway_settings(amqp_url, results_db, gateway_publish_timeout_s=0.5)
        async with serving(settings) as http, aiohttp.ClientSession(http.url) as client:
            async with client.post(FRAMES, data=jpeg_bytes(seed=1), headers=JPEG) as response:
                assert response.status == 202
            proxy.pause()  # the broker reads nothing more: no confirm comes
            blocked = jpeg_bytes(seed=2)
            async with client.post(FRAMES, data=blocked, headers=JPEG) as response:
                assert response.status == 503
                assert response.headers["Retry-After"] == str(settings.gateway_retry_after_s)
                assert "no confirm" in (await response.json())["detail"]
            proxy.resume()
            await wait_until(lambda: http.gateway.publisher.unconfirmed == 0, 30)
            # Sent again after the 503: the same task, and now confirmed.
            async with client.post(FRAMES, data=blocked, headers=JPEG) as response:
                assert response.status == 202


async def test_without_its_database_get_is_503_and_readyz_says_so(
    topology_settings: AdminSettings,
) -> None:
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/detfleet"
    async with (
        serving(gateway_settings(topology_settings.amqp_url, nowhere)) as http,
        aiohttp.ClientSession(http.url) as client,
    ):
        async with client.get("/v1/tasks/7d3c8f10-0b8e-4c57-9f0e-2a1e4cf4f7a1", headers=bearer()) as response:
            assert response.status == 503
            assert "Retry-After" in response.headers
        async with client.get("/readyz") as response:
            assert response.status == 503
            assert any(p.startswith("database") for p in (await response.json())["problems"])
        # The broker confirmed it: the frame is accepted, only its "pending" state goes unrecorded.
        async with client.post(FRAMES, data=jpeg_bytes(seed=3), headers=JPEG) as response:
            assert response.status == 202
