"""Starting, feeding and stopping each broker-fed peer the same way, and measuring it the same way.

A peer is a set of worker processes plus the way its frames are published. Two measurements:

- ``saturated``: a backlog of frames is published first, then the workers start; tasks/s from the rows
  (first receipt to last commit), CPU and peak RSS from the first row on (start-up excluded);
- ``paced``: the workers start and warm up on a few frames, then frames are published at a fixed rate;
  end-to-end latency from publish to committed row.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from bench.common import (
    BenchEnv,
    ResourceSampler,
    batch_compute_ms,
    batch_sizes,
    clean_env,
    end_to_end_ms,
    held_ms,
    latency_summary,
    percentile,
    rate_from_rows,
)
from bench.publishing import publish, schedule

STOP_GRACE_S = 30.0
ROWS_TIMEOUT_FLOOR_S = 60.0


class Peer(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def workers(self) -> int:
        """Messages it works on at once: the size of its warm-up."""

    def start(self, env: BenchEnv, model: Path, logs: Path) -> list[subprocess.Popen[bytes]]: ...

    async def publish(
        self, env: BenchEnv, bodies: Sequence[bytes], count: int, rate: float | None
    ) -> None: ...


def _spawn(
    argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )


@dataclass
class DetfleetPeer:
    replicas: int
    max_batch: int
    max_wait_ms: int = 20
    intra_op_threads: int = 0
    name: str = "detfleet"
    batches_in_flight: int | None = None  # DETFLEET_BATCHES_IN_FLIGHT; None: the default
    cwd: Path | None = None  # run the detfleet of another tree (``python -m`` imports from the cwd first)

    @property
    def workers(self) -> int:
        return self.replicas * self.max_batch

    def start(self, env: BenchEnv, model: Path, logs: Path) -> list[subprocess.Popen[bytes]]:
        argv = [sys.executable, "-m", "detfleet", "consume", "--model", str(model)]
        argv += ["--max-batch", str(self.max_batch), "--max-wait-ms", str(self.max_wait_ms)]
        processes = []
        for index in range(self.replicas):
            variables = {
                "DETFLEET_AMQP_URL": env.amqp_url,
                "DETFLEET_DATABASE_URL": env.database_url,
                "DETFLEET_DEVICE": "cpu",
                "DETFLEET_HEALTH_PORT": "0",
                "DETFLEET_LOG_LEVEL": "WARNING",
                "DETFLEET_CONSUMER_ID": f"bench-r{index + 1}",
                "DETFLEET_INTRA_OP_THREADS": str(self.intra_op_threads),
            }
            if self.batches_in_flight is not None:
                variables["DETFLEET_BATCHES_IN_FLIGHT"] = str(self.batches_in_flight)
            log = logs / f"detfleet-r{index + 1}.log"
            processes.append(_spawn(argv, clean_env(**variables), log, self.cwd))
        return processes

    async def publish(self, env: BenchEnv, bodies: Sequence[bytes], count: int, rate: float | None) -> None:
        await publish(env.amqp_url, bodies, count, rate=rate, detfleet=True)


@dataclass
class SeedPeer:
    workers: int
    name: str = "seed"

    def start(self, env: BenchEnv, model: Path, logs: Path) -> list[subprocess.Popen[bytes]]:
        argv = [sys.executable, "-m", "bench.peers.seed_peer", "--amqp-url", env.amqp_url]
        argv += ["--database-url", env.database_url, "--model", str(model), "--workers", str(self.workers)]
        return [_spawn(argv, clean_env(), logs / "seed.log")]

    async def publish(self, env: BenchEnv, bodies: Sequence[bytes], count: int, rate: float | None) -> None:
        await publish(env.amqp_url, bodies, count, rate=rate, detfleet=False)


@dataclass
class CeleryPeer:
    workers: int  # --concurrency
    name: str = "celery"

    def start(self, env: BenchEnv, model: Path, logs: Path) -> list[subprocess.Popen[bytes]]:
        from bench.peers.celery_peer import QUEUE

        argv = [sys.executable, "-m", "celery", "-A", "bench.peers.celery_peer", "worker"]
        argv += ["--concurrency", str(self.workers), "--pool", "prefork", "-O", "fair", "-Q", QUEUE]
        argv += ["--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"]
        variables = {"BENCH_AMQP_URL": env.amqp_url, "BENCH_DATABASE_URL": env.database_url}
        return [_spawn(argv, clean_env(**variables, BENCH_MODEL=str(model)), logs / "celery.log")]

    async def publish(self, env: BenchEnv, bodies: Sequence[bytes], count: int, rate: float | None) -> None:
        await asyncio.to_thread(_celery_publish, env.amqp_url, bodies, count, rate)


@dataclass
class CeleryBatchesPeer:
    workers: int  # --concurrency
    name: str = "celery_batches"

    def start(self, env: BenchEnv, model: Path, logs: Path) -> list[subprocess.Popen[bytes]]:
        from bench.peers.celery_batches_peer import QUEUE

        argv = [sys.executable, "-m", "celery", "-A", "bench.peers.celery_batches_peer", "worker"]
        argv += ["--concurrency", str(self.workers), "--pool", "prefork", "-Q", QUEUE]
        argv += ["--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"]
        variables = {"BENCH_AMQP_URL": env.amqp_url, "BENCH_DATABASE_URL": env.database_url}
        return [_spawn(argv, clean_env(**variables, BENCH_MODEL=str(model)), logs / "celery-batches.log")]

    async def publish(self, env: BenchEnv, bodies: Sequence[bytes], count: int, rate: float | None) -> None:
        from bench.peers.celery_batches_peer import TASK, app

        await asyncio.to_thread(_celery_publish, env.amqp_url, bodies, count, rate, app, TASK)


def _celery_publish(
    amqp_url: str,
    bodies: Sequence[bytes],
    count: int,
    rate: float | None,
    app: Any = None,
    task: str | None = None,
) -> None:
    """apply_async as a Celery user would call it: the frame's bytes, its id and the capture time (to the
    plain Celery peer's app and task unless told)."""
    if app is None or task is None:
        from bench.peers.celery_peer import TASK, app

        task = TASK
    app.conf.broker_url = amqp_url
    started = time.monotonic()
    with app.producer_or_acquire() as producer:
        for index, due in enumerate(schedule(count, rate)):
            delay = started + due - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing an open-loop publisher, not synchronisation
            captured = datetime.now(UTC).isoformat()
            body = bodies[index % len(bodies)]
            app.send_task(task, args=[body, str(uuid.uuid4()), captured], producer=producer)


async def stop(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM (graceful drain for detfleet, warm shutdown for Celery), then a kill after the grace."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(process.wait, max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()


def _alive(processes: Sequence[subprocess.Popen[bytes]]) -> bool:
    return all(p.poll() is None for p in processes)


def _timeout(count: int, rate_hint: float | None) -> float:
    return max(ROWS_TIMEOUT_FLOOR_S, 5 * count / rate_hint) if rate_hint else 600.0


async def saturated(
    env: BenchEnv,
    peer: Peer,
    model: Path,
    bodies: Sequence[bytes],
    count: int,
    logs: Path,
    rate_hint: float | None = None,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Backlog first, then the workers: tasks/s, held latency, CPU and RSS (see the module docstring)."""
    await env.reset_rows()
    await peer.publish(env, bodies, count, None)
    processes = peer.start(env, model, logs)
    spy = None
    try:
        await env.wait_rows(1, 120, lambda: _alive(processes))
        if profile is not None:
            spy = _py_spy(processes[0].pid, profile)
        with ResourceSampler(lambda: [p.pid for p in processes]) as sampler:
            await env.wait_rows(count, _timeout(count, rate_hint), lambda: _alive(processes))
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
        await stop(processes)
        if spy is not None:
            spy.wait(60)
    rows = await env.rows()
    compute = batch_compute_ms(rows)
    sizes = batch_sizes(rows)
    return {
        "tasks_per_s": rate_from_rows(rows),
        "rows": len(rows),
        "held_ms": latency_summary(held_ms(rows)),
        "batch_compute_ms_p50": percentile(compute, 50),
        "batch_size_mean": round(sum(sizes) / len(sizes), 2) if sizes else None,
        **sampler.figures(),
    }


def _py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    py_spy = Path(sys.executable).with_name("py-spy")
    argv = [str(py_spy), "record", "--pid", str(pid), "--output", str(out), "--rate", "100", "--nonblocking"]
    argv += ["--threads", "--idle"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def paced(
    env: BenchEnv,
    peer: Peer,
    model: Path,
    bodies: Sequence[bytes],
    rate: float,
    count: int,
    logs: Path,
) -> dict[str, Any]:
    """Warm workers fed at ``rate`` frames a second: publish-to-row latency and the rate achieved."""
    processes = peer.start(env, model, logs)
    try:
        await env.reset_rows()
        warm = max(2, min(peer.workers, 32))
        await peer.publish(env, bodies, warm, None)
        await env.wait_rows(warm, 180, lambda: _alive(processes))
        await env.reset_rows()
        with ResourceSampler(lambda: [p.pid for p in processes]) as sampler:
            await peer.publish(env, bodies, count, rate)
            await env.wait_rows(count, _timeout(count, rate), lambda: _alive(processes))
    finally:
        await stop(processes)
    rows = await env.rows()
    return {
        "offered_per_s": round(rate, 2),
        "achieved_per_s": rate_from_rows(rows),
        "latency_ms": latency_summary(end_to_end_ms(rows)),
        "batch_compute_ms_p50": percentile(batch_compute_ms(rows), 50),
        **sampler.figures(),
    }
