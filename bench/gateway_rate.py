"""Accepted frames per second through the HTTP gateway, against ``detfleet produce`` in the same run.

``detfleet gateway`` runs as its own process on loopback, with a bearer token and a rate limit no run reaches,
against a throw-away vhost and database; a load generator (aiohttp, ``--concurrency`` requests open at once)
POSTs ~50 KB JPEGs (raw body) to ``/v1/frames``, each answered 202 only once the broker confirmed it. Then
``detfleet produce`` publishes the same files (bench/publish_rate.py). Rounds alternate; the bulk queue is
purged between runs. Prints one JSON object: rates, the POST's p50/p99, and the ratio.

    .venv/bin/python -m bench.gateway_rate --frames 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench.publish_rate import make_frames, purge, run_produce
from bench.publishing import CAMERA, SITE
from producer.http.auth import hash_token
from shared import admin, db
from shared.management import Management
from shared.settings import DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL, DEFAULT_MANAGEMENT_URL, AdminSettings

TOKEN = "bench-token-" + uuid.uuid4().hex
READY_LIMIT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def gateway_process(
    amqp_url: str, database_url: str, port: int
) -> AsyncIterator[tuple[str, psutil.Process]]:
    tokens = [{"name": "bench", "sha256": hash_token(TOKEN), "publish": ["*"], "read": True}]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DETFLEET_")},
        "DETFLEET_AMQP_URL": amqp_url,
        "DETFLEET_DATABASE_URL": database_url,
        "DETFLEET_GATEWAY_TOKENS": json.dumps(tokens),
        "DETFLEET_GATEWAY_RATE": "1000000",
        "DETFLEET_GATEWAY_BURST": "1000000",
        "DETFLEET_LOG_LEVEL": "WARNING",
    }
    argv = [sys.executable, "-m", "detfleet", "gateway", "--port", str(port)]
    process = await asyncio.create_subprocess_exec(*argv, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url)
        yield url, psutil.Process(process.pid)
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)


async def wait_ready(url: str) -> None:
    deadline = time.monotonic() + READY_LIMIT_S
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise SystemExit(f"the gateway at {url} was not ready within {READY_LIMIT_S:g} s")


def children_cpu_seconds() -> float:
    """CPU time of the finished child processes (``detfleet produce`` runs), user and system."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def run_http(
    url: str, gateway: psutil.Process, bodies: list[bytes], frames: int, concurrency: int
) -> dict[str, float]:
    """POST ``frames`` frames, ``concurrency`` at once; each a task of its own (frame_id = its index). The
    gateway's CPU time per frame is the figure a busy machine disturbs least."""
    latencies: list[float] = []
    next_index = iter(range(frames))
    headers = {"Content-Type": "image/jpeg", "Authorization": f"Bearer {TOKEN}"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for index in next_index:
                query = f"site={SITE}&camera={CAMERA}&frame_id={index}-{uuid.uuid4().hex[:8]}"
                started = time.perf_counter()
                async with session.post(
                    f"{url}/v1/frames?{query}", data=bodies[index % len(bodies)], headers=headers
                ) as response:
                    await response.read()
                    if response.status != 202:
                        raise SystemExit(f"frame {index}: {response.status} {await response.text()}")
                latencies.append(time.perf_counter() - started)

        started, cpu_before = time.monotonic(), cpu_seconds(gateway)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed, cpu = time.monotonic() - started, cpu_seconds(gateway) - cpu_before
    ordered = sorted(latencies)
    return {
        "per_s": frames / elapsed,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "cpu_ms_per_frame": 1000 * cpu / frames,
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    vhost = "detfleet-bench-" + uuid.uuid4().hex[:8]
    amqp_url = DEFAULT_AMQP_URL.rstrip("/") + "/" + vhost
    database_url = DEFAULT_DATABASE_URL.rsplit("/", 1)[0] + "/detfleet_bench_" + uuid.uuid4().hex[:8]
    http_runs: list[dict[str, float]] = []
    produce_rates: list[float] = []
    produce_cpu: list[float] = []
    async with Management(DEFAULT_MANAGEMENT_URL) as api:
        await api.create_vhost(vhost)
        await api.grant(vhost, "guest")
        try:
            await admin.apply_topology(AdminSettings(amqp_url=amqp_url))
            await db.migrate(database_url)
            with tempfile.TemporaryDirectory() as folder:
                bodies = make_frames(Path(folder), args.distinct, args.frame_bytes)
                async with gateway_process(amqp_url, database_url, free_port()) as (url, gateway):
                    for _ in range(args.rounds):
                        http_runs.append(await run_http(url, gateway, bodies, args.frames, args.concurrency))
                        await purge(api, vhost)
                        produce = partial(run_produce, amqp_url, Path(folder), args.frames, args.in_flight)
                        before = children_cpu_seconds()
                        produce_rates.append(await asyncio.to_thread(produce))
                        produce_cpu.append(1000 * (children_cpu_seconds() - before) / args.frames)
                        await purge(api, vhost)
        finally:
            await api.delete_vhost(vhost)
            await db.drop_database(database_url)
    http_rate = statistics.median(r["per_s"] for r in http_runs)
    produce_rate = statistics.median(produce_rates)
    return {
        "frames": args.frames,
        "frame_bytes": round(statistics.mean(len(b) for b in bodies)),
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "gateway_per_s": round(http_rate, 1),
        "gateway_p50_ms": round(statistics.median(r["p50_ms"] for r in http_runs), 1),
        "gateway_p99_ms": round(statistics.median(r["p99_ms"] for r in http_runs), 1),
        "gateway_cpu_ms_per_frame": round(statistics.median(r["cpu_ms_per_frame"] for r in http_runs), 2),
        "produce_per_s": round(produce_rate, 1),
        # Its whole process: start-up and reading the files included, so an upper bound.
        "produce_cpu_ms_per_frame": round(statistics.median(produce_cpu), 2),
        "ratio": round(http_rate / produce_rate, 3),
        "gateway_runs": [{k: round(v, 1) for k, v in r.items()} for r in http_runs],
        "produce_runs": [round(r, 1) for r in produce_rates],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--frames", type=int, default=2000, help="frames per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each, alternating")
    parser.add_argument("--frame-bytes", type=int, default=50_000, help="approximate JPEG size")
    parser.add_argument("--distinct", type=int, default=100, help="distinct frames, cycled")
    parser.add_argument("--concurrency", type=int, default=32, help="HTTP requests open at once")
    parser.add_argument("--in-flight", type=int, default=256, help="detfleet produce: unconfirmed at once")
    print(json.dumps(asyncio.run(bench(parser.parse_args()))))


if __name__ == "__main__":
    main()
