"""Confirmed publishes per second: ``detfleet produce`` against a bare aio-pika pipelined loop.

Both publish the same ~50 KB JPEG frames, with the same properties and headers, to the bulk lane of a
throw-away vhost, with up to ``--in-flight`` publishes unconfirmed at once, and are timed from the first
publish to the last confirm. Rounds alternate between the two and the bulk queue is purged between runs;
the medians and their ratio are printed as one JSON object (goal: produce >= 90% of the bare loop).

    .venv/bin/python -m bench.publish_rate --frames 3000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import aio_pika
import cv2
import numpy as np

from bench.publishing import CAMERA, SITE, detfleet_message
from shared import admin
from shared.management import Management
from shared.settings import DEFAULT_AMQP_URL, DEFAULT_MANAGEMENT_URL, AdminSettings
from shared.topology import EXCHANGE_FRAMES, QUEUE_BULK


def make_frames(folder: Path, count: int, target_bytes: int) -> list[bytes]:
    """``count`` distinct noise JPEGs of about ``target_bytes`` each, written to ``folder`` too."""
    rng = np.random.default_rng(0)
    width = int((target_bytes / 0.93 * 4 / 3) ** 0.5)
    height = width * 3 // 4
    bodies = []
    for index in range(count):
        image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        ok, encoded = cv2.imencode(".jpg", image, [int(cv2.IMWRITE_JPEG_QUALITY), 90])
        assert ok
        body = encoded.tobytes()
        (folder / f"frame-{index:04d}.jpg").write_bytes(body)
        bodies.append(body)
    return bodies


def run_produce(amqp_url: str, folder: Path, frames: int, in_flight: int) -> float:
    """Frames confirmed per second by ``detfleet produce`` (its own --json figure)."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DETFLEET_")},
        "DETFLEET_AMQP_URL": amqp_url,
        "DETFLEET_MAX_IN_FLIGHT": str(in_flight),
        "DETFLEET_LOG_LEVEL": "WARNING",
    }
    argv = [sys.executable, "-m", "detfleet", "produce", "--source", str(folder), "--site", SITE]
    argv += ["--camera", CAMERA, "--lane", "bulk", "--loop", "--limit", str(frames), "--json"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"detfleet produce failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if summary["confirmed"] != frames:
        raise SystemExit(f"detfleet produce confirmed {summary['confirmed']} of {frames}")
    return float(summary["frames_per_s"])


async def run_bare(amqp_url: str, bodies: list[bytes], frames: int, in_flight: int) -> float:
    """Frames confirmed per second by a plain aio-pika loop keeping ``in_flight`` publishes open."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(EXCHANGE_FRAMES)
        window = asyncio.Semaphore(in_flight)

        async def publish(body: bytes) -> None:
            try:
                await exchange.publish(detfleet_message(body), f"bulk.{SITE}.{CAMERA}", mandatory=True)
            finally:
                window.release()

        started = time.monotonic()
        tasks = []
        for index in range(frames):
            await window.acquire()
            tasks.append(asyncio.create_task(publish(bodies[index % len(bodies)])))
        await asyncio.gather(*tasks)
        return frames / (time.monotonic() - started)
    finally:
        await connection.close()


async def purge(api: Management, vhost: str) -> None:
    await api.request("DELETE", f"/queues/{vhost}/{QUEUE_BULK}/contents")


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    vhost = "detfleet-bench-" + uuid.uuid4().hex[:8]
    amqp_url = DEFAULT_AMQP_URL.rstrip("/") + "/" + vhost
    async with Management(DEFAULT_MANAGEMENT_URL) as api:
        await api.create_vhost(vhost)
        await api.grant(vhost, "guest")
        try:
            await admin.apply_topology(AdminSettings(amqp_url=amqp_url))
            with tempfile.TemporaryDirectory() as folder:
                bodies = make_frames(Path(folder), args.distinct, args.frame_bytes)
                produce_rates, bare_rates = [], []
                for _ in range(args.rounds):
                    bare_rates.append(await run_bare(amqp_url, bodies, args.frames, args.in_flight))
                    await purge(api, vhost)
                    produce = partial(run_produce, amqp_url, Path(folder), args.frames, args.in_flight)
                    produce_rates.append(await asyncio.to_thread(produce))
                    await purge(api, vhost)
        finally:
            await api.delete_vhost(vhost)
    produce_rate, bare_rate = statistics.median(produce_rates), statistics.median(bare_rates)
    return {
        "frames": args.frames,
        "frame_bytes": round(statistics.mean(len(b) for b in bodies)),
        "in_flight": args.in_flight,
        "rounds": args.rounds,
        "produce_per_s": round(produce_rate, 1),
        "bare_per_s": round(bare_rate, 1),
        "ratio": round(produce_rate / bare_rate, 3),
        "produce_runs": [round(r, 1) for r in produce_rates],
        "bare_runs": [round(r, 1) for r in bare_rates],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--frames", type=int, default=3000, help="frames per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each, alternating")
    parser.add_argument("--frame-bytes", type=int, default=50_000, help="approximate JPEG size")
    parser.add_argument("--distinct", type=int, default=100, help="distinct frames, cycled")
    parser.add_argument("--in-flight", type=int, default=256, help="unconfirmed publishes at once")
    print(json.dumps(asyncio.run(bench(parser.parse_args()))))


if __name__ == "__main__":
    main()
