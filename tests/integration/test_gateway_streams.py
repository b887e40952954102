"""Live streams through ``detfleet produce --fps 2``: RTSP from GStreamer's server and MJPEG over HTTP
from ffmpeg, both on loopback, the server stopped and started again mid-run as a rebooting camera.

Times compared are the gateway's own stamps on each message (captured_at at the grab, the published-at
header at the send), never the test's own speed: they tell whether the gateway reads at the stream's pace
and publishes its freshest frame.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from datetime import datetime
from pathlib import Path

import pytest

from shared.broker.aio import Broker, Delivery
from shared.schema import Task
from shared.settings import AdminSettings
from shared.topology import QUEUE_BULK
from tests.integration.gateway_support import gateway
from tests.support.broker import read_all, wait_until
from tests.support.streams import CODE_BITS, STREAM_FPS, Kind, LiveServer, frame_code

FPS = 2.0
INTERVAL_S = 1 / FPS
WAIT_S = 60.0  # bound against a hang


async def wait_for_depth(broker: Broker, at_least: int) -> int:
    deadline = time.monotonic() + WAIT_S
    while (depth := await broker.queue_depth(QUEUE_BULK)) < at_least:
        assert time.monotonic() < deadline, f"only {depth} frames published"
        await asyncio.sleep(0.1)
    return depth


def stamps(delivery: Delivery) -> tuple[datetime, datetime]:
    task = Task.from_envelope(delivery.envelope)
    assert task.published_at is not None
    return task.captured_at, task.published_at


@pytest.mark.parametrize("kind", ["rtsp", "mjpeg"])
@pytest.mark.timeout(300)
async def test_a_live_stream_publishes_its_freshest_frame_each_tick_and_survives_a_camera_reboot(
    kind: Kind, topology_settings: AdminSettings, broker: Broker, tmp_path: Path
) -> None:
    server = LiveServer(kind, tmp_path / "server.log")
    args = ["--source", server.url, "--site", "site-a", "--camera", "cam-1", "--lane", "bulk"]
    with server:
        async with gateway(
            topology_settings.amqp_url, tmp_path / "gateway.log", *args, "--fps", str(FPS)
        ) as running:
            before = await wait_for_depth(broker, 5)
            await asyncio.to_thread(server.stop)
            await wait_until(lambda: "lost: reconnecting" in running.log_text(), WAIT_S)
            await asyncio.to_thread(server.start)
            await wait_for_depth(broker, before + 5)
            summary = await running.stop()

    assert summary["stream_gaps"] >= 1
    assert summary["gap_s"] > 0
    deliveries = await read_all(broker, QUEUE_BULK)
    assert len(deliveries) == summary["confirmed"] >= before + 5
    times = sorted((*stamps(d), d.envelope.body) for d in deliveries)
    # Fresh when published: none waited longer than one publish interval since its grab.
    assert max((published - captured).total_seconds() for captured, published, _ in times) < INTERVAL_S
    spacing = [(b[0] - a[0]).total_seconds() for a, b in itertools.pairwise(times)]
    steady = sorted(spacing)[:-1]  # without the reboot's gap, the longest
    assert all(0.3 <= s <= 0.8 for s in steady), spacing
    assert 0.4 <= statistics.median(steady) <= 0.6
    if kind == "mjpeg":
        assert_frames_skipped_at_the_streams_pace(times)


def assert_frames_skipped_at_the_streams_pace(times: list[tuple[datetime, datetime, bytes]]) -> None:
    """Between two published frames the stream moved on by as many frames as their capture times say:
    the gateway grabs every frame at 30 a second and skips those between ticks, instead of reading the
    next one in the stream's backlog.

    The first frame after the reboot is left out: the stream counts from 0 again, and a stream just opened
    hands over the few frames FFmpeg read ahead while probing it at once, so that frame's grab time is
    late by up to those few frames."""
    pairs = list(itertools.pairwise(times))
    reboot = max(range(len(pairs)), key=lambda i: pairs[i][1][0] - pairs[i][0][0])
    for index, ((first, _, body_a), (second, _, body_b)) in enumerate(pairs):
        if index in (reboot, reboot + 1):
            continue
        seconds = (second - first).total_seconds()
        moved = (frame_code(body_b) - frame_code(body_a)) % (1 << CODE_BITS)
        assert abs(moved - seconds * STREAM_FPS) <= 5, (moved, seconds)
