"""The HTTP gateway while its broker is stopped: 503 with Retry-After, never a 202, and /readyz says so."""

from __future__ import annotations

import aiohttp
import pytest

from shared import admin
from shared.settings import DEFAULT_DATABASE_URL, AdminSettings
from tests.chaos.nodes import PrivateRabbit
from tests.integration.http_gateway_support import bearer, gateway_settings, serving
from tests.support.broker import wait_until
from tests.support.frames import jpeg_bytes

LOST_LIMIT_S = 30.0  # bound against a hang


@pytest.mark.timeout(300)
async def test_a_stopped_broker_gives_503_with_retry_after(
    private_rabbit: PrivateRabbit, results_db: str
) -> None:
    await admin.apply_topology(
        AdminSettings(
            amqp_url=private_rabbit.amqp_url,
            management_url=private_rabbit.management_url,
            database_url=DEFAULT_DATABASE_URL,
        )
    )
    settings = gateway_settings(private_rabbit.amqp_url, results_db)
    url = "/v1/frames?site=site-a&camera=cam-1"
    headers = {"Content-Type": "image/jpeg", **bearer()}
    async with serving(settings) as http, aiohttp.ClientSession(http.url) as client:
        async with client.post(url, data=jpeg_bytes(seed=1), headers=headers) as response:
            assert response.status == 202
        private_rabbit.stop()
        await wait_until(lambda: not http.gateway.can_publish, LOST_LIMIT_S)
        async with client.post(url, data=jpeg_bytes(seed=2), headers=headers) as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == str(settings.gateway_retry_after_s)
            assert "broker" in (await response.json())["detail"]
        async with client.get("/readyz") as response:
            assert response.status == 503
            assert any("broker" in p for p in (await response.json())["problems"])
