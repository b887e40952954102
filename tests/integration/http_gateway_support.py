"""The HTTP gateway served in-process by uvicorn on a free loopback port, on the real broker and Postgres."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import cv2
import uvicorn

from detfleet import synth
from producer.http.app import create_app
from producer.http.auth import hash_token
from producer.http.runtime import Gateway
from shared.settings import GatewaySettings, GatewayToken
from tests.chaos.nodes import free_port
from tests.support.broker import wait_until

START_LIMIT_S = 30.0  # a bound against a hang, not a timing

# Tokens of the tests: a camera's (publish for site-a/cam-*), a reader's, and one that may do both.
CAMERA_TOKEN = "camera-token-0123456789abcdef0123456789abcdef"
READER_TOKEN = "reader-token-0123456789abcdef0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef0123456789abcdef"
TOKENS = (
    GatewayToken(name="site-a-cameras", sha256=hash_token(CAMERA_TOKEN), publish=("site-a/cam-*",)),
    GatewayToken(name="dashboard", sha256=hash_token(READER_TOKEN), read=True),
    GatewayToken(name="admin", sha256=hash_token(ADMIN_TOKEN), publish=("*",), read=True),
)


def bearer(token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def gateway_settings(amqp_url: str, database_url: str, **changes: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "amqp_url": amqp_url,
        "database_url": database_url,
        "gateway_tokens": TOKENS,
        "producer_name": "test-gateway",
        "log_json": False,
        "confirm_timeout_s": 5.0,
    }
    return GatewaySettings(**{**values, **changes})


@dataclass
class RunningGateway:
    url: str
    gateway: Gateway

    @property
    def ws_url(self) -> str:
        return "ws" + self.url.removeprefix("http")


@contextlib.asynccontextmanager
async def serving(settings: GatewaySettings, wait_connected: bool = True) -> AsyncIterator[RunningGateway]:
    """The gateway's app under uvicorn; with ``wait_connected``, only once it publishes and subscribes."""
    app = create_app(settings)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    running = RunningGateway(f"http://127.0.0.1:{port}", app.state.gateway)
    try:
        await wait_until(lambda: server.started or task.done(), START_LIMIT_S)
        assert not task.done(), "the gateway stopped during start-up"
        if wait_connected:
            gateway = running.gateway
            await wait_until(lambda: gateway.can_publish and gateway.broker is not None, START_LIMIT_S)
        yield running
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, START_LIMIT_S)


def scene_jpeg(seed: int) -> bytes:
    """A generated production-line frame (640x480) with objects the shipped detector finds."""
    ok, data = cv2.imencode(".jpg", synth.render_scene(seed).image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return bytes(data)
