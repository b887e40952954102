"""Probes and metrics: /readyz false before warm-up and true after; /metrics exposes each metric."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

import aiohttp

from consumer.detector.fake import FakeDetector
from shared import db
from shared.broker.aio import Broker
from shared.settings import AdminSettings
from tests.integration.consumer_support import consumer_settings, jpeg, make_task, publish, running

METRICS = (
    "detfleet_received_total",
    "detfleet_outcomes_total",
    "detfleet_redeliveries_absorbed_total",
    "detfleet_batch_size_bucket",
    "detfleet_queue_wait_seconds_bucket",
    "detfleet_decode_seconds_bucket",
    "detfleet_inference_seconds_bucket",
    "detfleet_sink_seconds_bucket",
    "detfleet_end_to_end_seconds_bucket",
    "detfleet_in_flight",
    "detfleet_model_info",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatedDetector(FakeDetector):
    """A fake whose warm-up waits for the test to open a gate: readiness before warm-up is observable."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def warm_up(self) -> None:
        assert self.gate.wait(30)
        super().warm_up()


async def get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()


async def wait_for_status(port: int, path: str, status: int) -> str:
    for _ in range(200):  # bounded: 20 s at most
        try:
            got, text = await get(port, path)
        except aiohttp.ClientConnectionError:
            got, text = 0, ""
        if got == status:
            return text
        await asyncio.sleep(0.1)
    raise AssertionError(f"{path} never answered {status}")


async def test_readiness_follows_warm_up_and_metrics_are_exposed(
    broker: Broker, topology_settings: AdminSettings, database_url: str
) -> None:
    await db.migrate(database_url)
    port = free_port()
    detector = GatedDetector()
    settings = consumer_settings(topology_settings, database_url, health_port=port, exit_when_idle_s=None)
    async with running(settings, detector):
        text = await wait_for_status(port, "/readyz", 503)
        assert "model" in text
        assert (await get(port, "/livez"))[0] == 200
        detector.gate.set()
        await wait_for_status(port, "/readyz", 200)

        await publish(broker, make_task(), jpeg(1))
        body = await wait_for_status(port, "/metrics", 200)
        for _ in range(100):
            if 'detfleet_outcomes_total{kind="ok"} 1.0' in body:
                break
            await asyncio.sleep(0.1)
            body = (await get(port, "/metrics"))[1]
    for name in METRICS:
        assert name in body, name
    assert 'detfleet_outcomes_total{kind="ok"} 1.0' in body
    assert 'detfleet_camera_frames_settled_total{camera="cam-1",lane="bulk",status="ok"} 1.0' in body
    assert 'detfleet_camera_frames_received_total{camera="cam-1"} 1.0' in body


async def test_the_log_level_changes_at_run_time(topology_settings: AdminSettings, database_url: str) -> None:
    await db.migrate(database_url)
    port = free_port()
    settings = consumer_settings(topology_settings, database_url, health_port=port, exit_when_idle_s=None)
    root = logging.getLogger()
    before = root.level
    try:
        async with running(settings, FakeDetector()):
            await wait_for_status(port, "/readyz", 200)
            assert await put(port, "/loglevel?level=debug") == (200, "log level DEBUG\n")
            assert root.level == logging.DEBUG
            status, text = await put(port, "/loglevel?level=LOUD")
            assert status == 400
            assert "DEBUG, INFO, WARNING, ERROR" in text
            assert root.level == logging.DEBUG
    finally:
        root.setLevel(before)


async def put(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.put(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()
