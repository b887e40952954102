"""Overload: producers offer about twice what the fleet can do, and every frame still has an account.

The harness measures one consumer replica's capacity first (a slow convolutional model, batch 4, one ONNX
thread), shrinks the lanes (small max-length policies), then runs two ``detfleet produce`` processes for a
while: each lane at the measured capacity, together 2x. Realtime is served first, so bulk starves
and fills up: its producer must be pushed back (nacks, bounded retries) and end with a clear one-line error
and a non-zero exit. The full realtime lane drops its oldest frames into the intake, which the consumer
turns into ``shed`` rows. The consumer's RSS is sampled throughout. When the producers are done the
consumer drains everything, stops on SIGTERM, and each lane's rows are counted against the frames its
producer had confirmed: nothing may be unaccounted.

Everything runs against this machine's loopback servers, in a vhost and a database of its own (removed at
the end), bounded in time.

    python -m tests.chaos.overload                 # two minutes of overload
    python -m tests.chaos.overload --duration 20   # what the integration test runs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psutil
from rich.console import Console
from rich.table import Table

from shared import admin, db
from shared.broker.aio import Broker
from shared.management import Management
from shared.settings import DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL, DEFAULT_MANAGEMENT_URL, AdminSettings
from shared.topology import QUEUE_BULK, QUEUE_INTAKE, QUEUE_REALTIME, QUEUE_RETRY_READY, Topology
from tests.integration.consumer_support import consumer_process
from tests.support.broker import override_policy
from tests.support.frames import jpeg_bytes
from tests.support.onnx_graphs import write_conv_head_model

SITE = "overload"
CALIBRATION_CAMERA = "calibration"
LANE_CAMERAS = {"bulk": "bulk-cam", "realtime": "realtime-cam"}
SAMPLE_S = 0.2
POLL_S = 0.2
START_LIMIT_S = 60.0  # bounds against hangs, never timing assertions
DRAIN_LIMIT_S = 180.0
STOP_LIMIT_S = 30.0


@dataclass(frozen=True)
class OverloadConfig:
    duration_s: float = 120.0
    factor: float = 2.0  # offered load over measured capacity, both lanes together
    # Of the offered load; the rest goes to bulk. Half and half: bulk alone at full capacity still fills
    # its lane when the capacity measured beforehand was optimistic (a busy machine).
    realtime_share: float = 0.5
    bulk_max_length: int = 40
    realtime_max_length: int = 10
    nack_retries: int = 2
    nack_backoff_s: float = 0.05
    calibration_frames: int = 40
    max_batch: int = 4


@dataclass
class ProducerRun:
    """One ``detfleet produce`` process: its exit code, its JSON summary and the last line it wrote."""

    lane: str
    fps: float
    exit_code: int | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    last_error: str = ""

    @property
    def confirmed(self) -> int:
        return int(self.summary.get("confirmed", 0))

    @property
    def unconfirmed(self) -> int:
        return int(self.summary.get("unconfirmed", 0))


@dataclass
class OverloadReport:
    capacity_fps: float
    offered_fps: float
    producers: dict[str, ProducerRun]
    rows: dict[str, dict[str, int]]  # lane -> status -> rows
    peak_rss_mb: float
    start_rss_mb: float
    seconds: float
    consumer_exit: int | None

    def rows_of(self, lane: str) -> int:
        return sum(self.rows.get(lane, {}).values())

    def unaccounted(self, lane: str) -> int:
        """Confirmed frames of ``lane`` without a row (a frame whose confirm was lost may have one extra)."""
        return max(self.producers[lane].confirmed - self.rows_of(lane), 0)

    def strays(self, lane: str) -> int:
        """Rows beyond what the producer confirmed or left unconfirmed: frames that came from nowhere."""
        run = self.producers[lane]
        return max(self.rows_of(lane) - run.confirmed - run.unconfirmed, 0)


# ---- processes ---------------------------------------------------------------------------------------------


def _env(**settings: str | float | int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("DETFLEET_")}
    return env | {f"DETFLEET_{name.upper()}": str(value) for name, value in settings.items()}


@contextlib.asynccontextmanager
async def consumer(
    model: Path, amqp_url: str, database_url: str, config: OverloadConfig, log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    env = _env(
        amqp_url=amqp_url,
        database_url=database_url,
        health_port=0,
        log_json="false",
        max_batch=config.max_batch,
        intra_op_threads=1,
        decode_threads=1,
        consumer_id="overload-consumer",
    )
    async with consumer_process(model, env, log) as process:
        yield process


async def produce(
    frames: Path, amqp_url: str, lane: str, camera: str, limit: int, fps: float | None, config: OverloadConfig
) -> ProducerRun:
    """Run ``detfleet produce`` to the end; its summary is the last line of stdout (``--json``)."""
    args = ["--source", str(frames), "--site", SITE, "--camera", camera, "--lane", lane, "--loop"]
    args += ["--limit", str(limit), "--json", *(["--fps", f"{fps:.2f}"] if fps else [])]
    env = _env(
        amqp_url=amqp_url,
        log_json="false",
        producer_name=f"overload-{lane}",
        nack_retries=config.nack_retries,
        nack_backoff_s=config.nack_backoff_s,
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "detfleet",
        "produce",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    bound = limit / fps + START_LIMIT_S if fps else START_LIMIT_S
    try:
        out, err = await asyncio.wait_for(process.communicate(), bound)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"detfleet produce ({lane}) did not finish in {bound:.0f} s") from None
    run = ProducerRun(lane, fps or 0.0, process.returncode)
    lines = out.decode(errors="replace").strip().splitlines()
    if lines:
        run.summary = json.loads(lines[-1])
    errors = [line for line in err.decode(errors="replace").splitlines() if "error:" in line]
    run.last_error = errors[-1] if errors else ""
    return run


async def sample_rss(pid: int, samples: list[float], stop: asyncio.Event) -> None:
    process = psutil.Process(pid)
    while not stop.is_set():
        with contextlib.suppress(psutil.Error):
            samples.append(process.memory_info().rss / 2**20)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_S)


# ---- broker and database -----------------------------------------------------------------------------------


async def rows_by_camera(database_url: str) -> dict[str, dict[str, int]]:
    conn = await asyncpg.connect(database_url)
    try:
        records = await conn.fetch(
            "SELECT camera_id, status, count(*) AS n FROM detfleet_results GROUP BY camera_id, status"
        )
    finally:
        await conn.close()
    rows: dict[str, dict[str, int]] = {}
    for r in records:
        rows.setdefault(r["camera_id"] or "(none)", {})[r["status"]] = int(r["n"])
    return rows


async def calibration_span(database_url: str) -> tuple[int, float]:
    """Rows of the calibration frames and the seconds between the first and the last completing."""
    conn = await asyncpg.connect(database_url)
    try:
        record = await conn.fetchrow(
            "SELECT count(*) AS n, extract(epoch FROM max(completed_at) - min(completed_at)) AS span "
            "FROM detfleet_results WHERE camera_id = $1",
            CALIBRATION_CAMERA,
        )
    finally:
        await conn.close()
    assert record is not None
    return int(record["n"]), float(record["span"] or 0.0)


async def wait_for(check: Any, what: str, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting until {what}")
        await asyncio.sleep(POLL_S)


async def queues_empty(broker: Broker, queues: Sequence[str]) -> bool:
    for queue in queues:
        if await broker.queue_depth(queue):
            return False
    return True


# ---- the run -----------------------------------------------------------------------------------------------


class Overload:
    def __init__(
        self,
        settings: AdminSettings,
        management: Management,
        database_url: str,
        workdir: Path,
        config: OverloadConfig,
    ) -> None:
        self.settings = settings
        self.management = management
        self.database_url = database_url
        self.workdir = workdir
        self.config = config
        self.topology = Topology.from_settings(settings)

    async def run(self) -> OverloadReport:
        frames = self._frames()
        model = write_conv_head_model(self.workdir / "slow.onnx", input_size=(320, 320), width=16)
        url, started = self.settings.amqp_url, time.monotonic()
        broker = await Broker.connect(url, "overload:monitor")
        try:
            async with consumer(
                model, url, self.database_url, self.config, self.workdir / "consumer.log"
            ) as proc:
                capacity = await self._calibrate(frames, broker)
                await self._shrink_lanes()
                offered = capacity * self.config.factor
                samples: list[float] = []
                stop = asyncio.Event()
                sampler = asyncio.create_task(sample_rss(proc.pid, samples, stop))
                producers = await self._overload(frames, offered)
                await self._drain(broker)
                stop.set()
                await sampler
                proc.send_signal(signal.SIGTERM)
                consumer_exit = await asyncio.wait_for(proc.wait(), STOP_LIMIT_S)
        finally:
            await broker.close()
        by_camera = await rows_by_camera(self.database_url)
        return OverloadReport(
            capacity_fps=capacity,
            offered_fps=offered,
            producers=producers,
            rows={lane: by_camera.get(camera, {}) for lane, camera in LANE_CAMERAS.items()},
            peak_rss_mb=max(samples, default=0.0),
            start_rss_mb=samples[0] if samples else 0.0,
            seconds=time.monotonic() - started,
            consumer_exit=consumer_exit,
        )

    async def _calibrate(self, frames: Path, broker: Broker) -> float:
        """Frames per second the consumer completes with a full bulk lane in front of it."""
        count = self.config.calibration_frames
        run = await produce(
            frames, self.settings.amqp_url, "bulk", CALIBRATION_CAMERA, count, None, self.config
        )
        assert run.exit_code == 0, f"calibration publish failed: {run.last_error}"

        async def all_rows() -> bool:
            return (await calibration_span(self.database_url))[0] >= count

        await wait_for(all_rows, "the calibration frames have rows", DRAIN_LIMIT_S)
        rows, span = await calibration_span(self.database_url)
        return (rows - 1) / max(span, 1e-3)

    async def _shrink_lanes(self) -> None:
        config = self.config
        await override_policy(
            self.management, self.settings, QUEUE_BULK, **{"max-length": config.bulk_max_length}
        )
        await override_policy(
            self.management, self.settings, QUEUE_REALTIME, **{"max-length": config.realtime_max_length}
        )

    async def _overload(self, frames: Path, offered: float) -> dict[str, ProducerRun]:
        shares = {"realtime": self.config.realtime_share, "bulk": 1 - self.config.realtime_share}
        runs = await asyncio.gather(
            *(
                produce(
                    frames,
                    self.settings.amqp_url,
                    lane,
                    LANE_CAMERAS[lane],
                    max(int(offered * share * self.config.duration_s), 1),
                    offered * share,
                    self.config,
                )
                for lane, share in shares.items()
            )
        )
        return {run.lane: run for run in runs}

    async def _drain(self, broker: Broker) -> None:
        """Until every queue the consumer reads (retry delays included) is empty and the rows stop growing."""
        queues = [QUEUE_REALTIME, QUEUE_BULK, QUEUE_RETRY_READY, QUEUE_INTAKE, *self.topology.retry_levels]
        last = -1

        async def settled() -> bool:
            nonlocal last
            if not await queues_empty(broker, queues):
                return False
            total = sum(sum(s.values()) for s in (await rows_by_camera(self.database_url)).values())
            done, last = total == last, total
            return done

        await wait_for(settled, "the consumer drained every queue", DRAIN_LIMIT_S)

    def _frames(self) -> Path:
        folder = self.workdir / "frames"
        folder.mkdir(exist_ok=True)
        for seed in range(8):
            (folder / f"frame-{seed}.jpg").write_bytes(jpeg_bytes(320, 240, seed=seed))
        return folder


async def run_overload(config: OverloadConfig) -> OverloadReport:
    """The whole run in a vhost and a database of its own on the loopback servers, both removed after."""
    name = f"detfleet-overload-{uuid.uuid4().hex[:8]}"
    database_url = DEFAULT_DATABASE_URL.rsplit("/", 1)[0] + "/" + name.replace("-", "_")
    settings = AdminSettings(amqp_url=DEFAULT_AMQP_URL.rstrip("/") + "/" + name, database_url=database_url)
    async with Management(DEFAULT_MANAGEMENT_URL) as management:
        await management.create_vhost(name)
        try:
            await management.grant(name, "guest")
            await admin.apply_topology(settings)
            await db.ensure_database(database_url)
            try:
                await db.migrate(database_url)
                with tempfile.TemporaryDirectory(prefix="detfleet-overload-") as workdir:
                    return await Overload(settings, management, database_url, Path(workdir), config).run()
            finally:
                await db.drop_database(database_url)
        finally:
            await management.delete_vhost(name)


def report_table(report: OverloadReport) -> Table:
    table = Table(
        title=f"overload: {report.offered_fps:.1f} frames/s offered, capacity {report.capacity_fps:.1f}"
    )
    for column in ("lane", "offered/s", "confirmed", "nacked", "exit", "rows", "unaccounted", "strays"):
        table.add_column(column, justify="right" if column != "lane" else "left")
    for lane, run in report.producers.items():
        rows = ", ".join(f"{status} {n}" for status, n in sorted(report.rows.get(lane, {}).items()))
        table.add_row(
            lane,
            f"{run.fps:.1f}",
            str(run.confirmed),
            str(run.summary.get("nacked", 0)),
            str(run.exit_code),
            rows or "-",
            str(report.unaccounted(lane)),
            str(report.strays(lane)),
        )
    return table


def print_report(report: OverloadReport) -> None:
    console = Console(width=max(Console().width, 110))
    console.print(report_table(report))
    for lane, run in report.producers.items():
        if run.last_error:
            console.print(f"{lane} producer: {run.last_error}")
    console.print(
        f"consumer RSS: {report.start_rss_mb:.0f} MiB at the start, peak {report.peak_rss_mb:.0f} MiB; "
        f"exit {report.consumer_exit}; {report.seconds:.0f} s in all"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos.overload", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--duration", type=float, default=OverloadConfig.duration_s, help="seconds of overload"
    )
    parser.add_argument("--factor", type=float, default=OverloadConfig.factor, help="offered load / capacity")
    args = parser.parse_args(argv)
    report = asyncio.run(run_overload(OverloadConfig(duration_s=args.duration, factor=args.factor)))
    print_report(report)
    accounted = all(report.unaccounted(lane) == 0 and report.strays(lane) == 0 for lane in report.producers)
    pushed_back = report.producers["bulk"].exit_code != 0 and bool(report.rows["realtime"].get("shed"))
    return 0 if accounted and pushed_back and report.consumer_exit == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
