"""What every part of ``make bench`` shares: frames, models, a throw-away vhost and database, the figures.

Pure helpers (percentiles, ratios, rates from rows) are kept free of I/O so tests/unit/test_bench*.py can
check them without a broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import cv2
import numpy as np
import psutil

from shared import admin, db
from shared.management import Management
from shared.settings import (
    DEFAULT_AMQP_URL,
    DEFAULT_DATABASE_URL,
    DEFAULT_MANAGEMENT_URL,
    AdminSettings,
    shipped_model_path,
)
from tests.support.onnx_graphs import conv_gflops, write_bright_square_model, write_compute_bound_model

FRAME_SIZE = (640, 480)  # (width, height)
JPEG_QUALITY = 90
ROW_POLL_S = 0.2

# ---- pure figures ---------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), or None for no values (JSON null, never NaN)."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def latency_summary(values_ms: Sequence[float]) -> dict[str, float | int | None]:
    """p50, p99 and the count of a latency sample, in milliseconds rounded to 0.1."""
    return {
        "p50": _round(percentile(values_ms, 50)),
        "p99": _round(percentile(values_ms, 99)),
        "n": len(values_ms),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator rounded to 0.001, or None where either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0 or math.isnan(denominator):
        return None
    return round(numerator / denominator, 3)


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def rate_from_rows(rows: Sequence[dict[str, Any]]) -> float | None:
    """Tasks per second: rows / (last completed_at - first received_at). Start-up before the first receipt
    (imports, model load) is not counted; everything after it is."""
    if not rows:
        return None
    start: datetime = min(r["received_at"] for r in rows)
    end: datetime = max(r["completed_at"] for r in rows)
    wall = (end - start).total_seconds()
    return round(len(rows) / wall, 2) if wall > 0 else None


def end_to_end_ms(rows: Iterable[dict[str, Any]]) -> list[float]:
    """completed_at - captured_at of every row that has both (captured_at is the publish time here)."""
    return [
        (r["completed_at"] - r["captured_at"]).total_seconds() * 1000
        for r in rows
        if r.get("captured_at") is not None
    ]


def held_ms(rows: Iterable[dict[str, Any]]) -> list[float]:
    """completed_at - received_at: the time a task spent inside the worker."""
    return [(r["completed_at"] - r["received_at"]).total_seconds() * 1000 for r in rows]


def batch_compute_ms(rows: Iterable[dict[str, Any]]) -> list[float]:
    """decode + inference milliseconds of each detfleet batch: its rows share consumer, completed_at and
    inference_ms, and carry the whole batch's decode_ms and inference_ms, so one value per batch."""
    batches: dict[tuple[Any, Any, Any], float] = {}
    for row in rows:
        if row.get("inference_ms") is None:
            continue
        key = (row["consumer_id"], row["completed_at"], row["inference_ms"])
        batches[key] = float(row["inference_ms"]) + float(row.get("decode_ms") or 0.0)
    return list(batches.values())


def batch_sizes(rows: Iterable[dict[str, Any]]) -> list[int]:
    """How many rows each batch (grouped as in batch_compute_ms) had."""
    counts: dict[tuple[Any, Any, Any], int] = {}
    for row in rows:
        if row.get("inference_ms") is None:
            continue
        key = (row["consumer_id"], row["completed_at"], row["inference_ms"])
        counts[key] = counts.get(key, 0) + 1
    return sorted(counts.values())


# ---- frames and models ----------------------------------------------------------------------------------


def make_frames(count: int, seed: int = 0, size: tuple[int, int] = FRAME_SIZE) -> list[bytes]:
    """``count`` distinct JPEG q90 frames of ``size`` (640x480 unless told): the project's synthetic scenes
    where detfleet.synth is there, else gradient-and-rectangle scenes of similar size and entropy."""
    try:
        from detfleet import synth

        render = getattr(synth, "render_scene", None)
    except ImportError:
        render = None
    bodies = []
    rng = np.random.default_rng(seed)
    for index in range(count):
        if render is not None:
            image = np.asarray(render(seed + index, size=size).image)
        else:
            image = _stand_in_scene(rng, size)
        ok, encoded = cv2.imencode(".jpg", image, [int(cv2.IMWRITE_JPEG_QUALITY), JPEG_QUALITY])
        if not ok:
            raise RuntimeError("OpenCV could not encode a JPEG")
        bodies.append(encoded.tobytes())
    return bodies


def _stand_in_scene(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    ramp = np.linspace(0.6, 1.0, width, dtype=np.float32)[None, :, None]
    image = np.broadcast_to(np.asarray(rng.uniform(40, 200, 3), np.float32) * ramp, (height, width, 3)).copy()
    for _ in range(int(rng.integers(3, 9))):
        x, y = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        w, h = int(rng.integers(20, 200)), int(rng.integers(20, 160))
        cv2.rectangle(image, (x, y), (x + w, y + h), tuple(float(c) for c in rng.uniform(0, 255, 3)), -1)
    image += np.asarray(rng.normal(0, 6, image.shape), np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class ModelSpec:
    key: str  # "default" or "compute": the JSON key of everything measured with it
    path: Path
    description: str
    gflops: float


def default_model(folder: Path, override: Path | None = None) -> ModelSpec:
    """The shipped detector (models/detfleet-line-320.onnx); until it exists, a 320x320 stand-in graph."""
    path = override or shipped_model_path()
    if path.exists():
        return ModelSpec("default", path, f"shipped detector {path.name}", round(conv_gflops(path), 2))
    stand_in = write_bright_square_model(folder / "stand-in-320.onnx", input_size=(320, 320))
    description = f"stand-in for the missing {path.name}: bright-square graph, 320x320 (no convolutions)"
    return ModelSpec("default", stand_in, description, 0.0)


def compute_model(folder: Path) -> ModelSpec:
    path = write_compute_bound_model(folder / "compute-bound-640.onnx")
    gflops = round(conv_gflops(path), 2)
    description = f"compute-bound conv head, random weights, 640x640, {gflops} GFLOPs an image"
    return ModelSpec("compute", path, description, gflops)


# ---- a throw-away vhost and database ----------------------------------------------------------------------


@dataclass
class BenchEnv:
    """A vhost with detfleet's topology and a migrated database, named after it, removed by close()."""

    name: str
    amqp_url: str
    database_url: str
    management_url: str = DEFAULT_MANAGEMENT_URL

    @classmethod
    async def create(cls) -> BenchEnv:
        name = "detfleet-bench-" + uuid.uuid4().hex[:8]
        env = cls(
            name=name,
            amqp_url=DEFAULT_AMQP_URL.rstrip("/") + "/" + name,
            database_url=DEFAULT_DATABASE_URL.rsplit("/", 1)[0] + "/" + name.replace("-", "_"),
        )
        async with Management(env.management_url) as api:
            await api.create_vhost(name)
            await api.grant(name, "guest")
        await admin.apply_topology(AdminSettings(amqp_url=env.amqp_url, database_url=env.database_url))
        await db.migrate(env.database_url)
        return env

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            async with Management(self.management_url) as api:
                await api.delete_vhost(self.name)
        with contextlib.suppress(Exception):
            await db.drop_database(self.database_url)

    async def reset_rows(self) -> None:
        conn = await db.connect(self.database_url)
        try:
            await conn.execute("TRUNCATE detfleet_results")
        finally:
            await conn.close()

    async def rows(self) -> list[dict[str, Any]]:
        conn = await db.connect(self.database_url)
        try:
            records = await conn.fetch(
                "SELECT task_id, consumer_id, status, captured_at, received_at, completed_at, decode_ms,"
                " inference_ms FROM detfleet_results"
            )
        finally:
            await conn.close()
        return [dict(r) for r in records]

    async def wait_rows(self, count: int, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> int:
        """Poll until the table holds ``count`` rows; a generous bound catches a hang or a dead worker."""
        conn = await db.connect(self.database_url)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                got = int(await conn.fetchval("SELECT count(*) FROM detfleet_results"))
                if got >= count:
                    return got
                if time.monotonic() > deadline or not alive():
                    raise RuntimeError(f"only {got} of {count} rows arrived")
                await asyncio.sleep(ROW_POLL_S)
        finally:
            await conn.close()


async def insert_row(conn: asyncpg.Connection, row: dict[str, Any]) -> None:
    """One result row, one statement: what the peers do per message (detfleet writes one per batch)."""
    await conn.execute(
        "INSERT INTO detfleet_results (task_id, captured_at, received_at, completed_at, status, consumer_id,"
        " inference_ms, image_width, image_height, detections, end_to_end_ms)"
        " VALUES ($1, $2, $3, $4, 'ok', $5, $6, $7, $8, $9::jsonb, $10)",
        row["task_id"],
        row["captured_at"],
        row["received_at"],
        row["completed_at"],
        row["consumer_id"],
        row["inference_ms"],
        row["width"],
        row["height"],
        row["detections"],
        (row["completed_at"] - row["captured_at"]).total_seconds() * 1000,
    )


# ---- CPU and memory of the processes involved ------------------------------------------------------


def _named(names: set[str]) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["name"]):
        if process.info["name"] in names:
            found.append(process)
    return found


@dataclass
class _Group:
    processes: dict[int, psutil.Process] = field(default_factory=dict)
    cpu_first: dict[int, float] = field(default_factory=dict)
    cpu_last: dict[int, float] = field(default_factory=dict)
    peak_rss: dict[int, int] = field(default_factory=dict)

    def sample(self) -> None:
        for pid, process in list(self.processes.items()):
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    rss = process.memory_info().rss
            except psutil.Error:
                continue
            cpu = times.user + times.system
            self.cpu_first.setdefault(pid, cpu)
            self.cpu_last[pid] = cpu
            self.peak_rss[pid] = max(self.peak_rss.get(pid, 0), rss)

    def cpu_seconds(self) -> float:
        return sum(self.cpu_last[p] - self.cpu_first[p] for p in self.cpu_last)


class ResourceSampler:
    """CPU seconds of the workers (with their children), of RabbitMQ (beam.smp) and of Postgres, and the
    workers' peak RSS, sampled every ``interval_s`` in a thread between start() and stop()."""

    def __init__(self, worker_pids: Callable[[], Iterable[int]], interval_s: float = 0.25) -> None:
        self._worker_pids = worker_pids
        self._interval_s = interval_s
        self._groups = {"workers": _Group(), "broker": _Group(), "postgres": _Group()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="resource-sampler", daemon=True)
        self._started = 0.0
        self.wall_s = 0.0

    def __enter__(self) -> ResourceSampler:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.wall_s = time.monotonic() - self._started

    def _refresh(self) -> None:
        for group, processes in (("broker", _named({"beam.smp"})), ("postgres", _named({"postgres"}))):
            for process in processes:
                self._groups[group].processes.setdefault(process.pid, process)
        workers = self._groups["workers"]
        for pid in self._worker_pids():
            with contextlib.suppress(psutil.Error):
                root = workers.processes.setdefault(pid, psutil.Process(pid))
                for child in root.children(recursive=True):
                    workers.processes.setdefault(child.pid, child)

    def _loop(self) -> None:
        while True:
            self._refresh()
            for group in self._groups.values():
                group.sample()
            if self._stop.wait(self._interval_s):
                break
        for group in self._groups.values():
            group.sample()

    def figures(self) -> dict[str, float | None]:
        """CPU use as cores busy (1.0 = one core all the time) per group, and the workers' peak RSS in MiB:
        the largest single process and the sum of every worker process's own peak."""
        wall = max(self.wall_s, 1e-9)
        workers = self._groups["workers"]
        peaks = list(workers.peak_rss.values())
        return {
            "cpu_cores_workers": round(workers.cpu_seconds() / wall, 2),
            "cpu_cores_broker": round(self._groups["broker"].cpu_seconds() / wall, 2),
            "cpu_cores_postgres": round(self._groups["postgres"].cpu_seconds() / wall, 2),
            "peak_rss_mib_max": round(max(peaks) / 2**20, 1) if peaks else None,
            "peak_rss_mib_sum": round(sum(peaks) / 2**20, 1) if peaks else None,
        }


def clean_env(**variables: str) -> dict[str, str]:
    """This process's environment without DETFLEET_ or BENCH_ variables, plus the given ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DETFLEET_", "BENCH_"))}
    env.update(variables)
    return env
