"""Tasks per second of ``detfleet consume`` over a backlog: 1 and 2 replicas, at several max-batch settings.

Everything lives in a throw-away vhost and database, removed at the end. For every (max batch, replicas)
pair the script empties the results table, publishes ``--frames`` 640x480 JPEG frames to the bulk lane with
``detfleet produce`` (all confirmed before any consumer starts), then starts the replicas as
``detfleet consume`` subprocesses (CPU, ``--exit-when-idle 1``) and waits until every task has its row.

Figures, all read back from the rows:

- tasks/s: rows / (max(completed_at) - min(received_at)), so replica start-up (imports, model load) is not
  counted but a replica that joins late is (the stagger is in the JSON as ``join_lag_s``);
- held p50/p95: completed_at - received_at per row, the time a task spent inside a consumer (prefetch
  buffer, decode, inference, write), which is the latency a consumer adds when there is a backlog;
- capture-to-row p50/p95: the rows' own end_to_end_ms, which over a backlog mostly measures the backlog;
- batches formed: rows of one inference batch share one completed_at and one inference_ms (the worker
  stamps both once per batch), so grouping ok rows by (consumer_id, completed_at, inference_ms) recovers
  every batch exactly, without scraping /metrics before the replica exits. ``--scrape-metrics`` also
  polls each replica's detfleet_batch_size histogram as a cross-check (the health server binds 0.0.0.0,
  so it is off by default to keep the run loopback-only);
- infer+wait ms/batch: the rows' inference_ms, which the worker times around its hand-off to its single
  inference thread, so with two batches in flight it includes waiting for the batch ahead;
- detect-only img/s: the detector alone in this process at each max batch before the runs, nothing else
  running: the model's own ceiling on this machine;
- CPU busy: the whole machine's busy share over the consume phase (broker and Postgres included).

The JSON also has the means of the rows' decode_ms (the whole batch's decode, stamped on each row) and
sink_ms (what the worker stores there: from the batch's latest receipt to its write, not the write itself).

The default model is the synthetic YOLOv8-shaped conv head of tests/support/onnx_graphs.py at 320x320
(random weights, about 0.9 GFLOPs an image, 2100 anchors, 80 classes); ``--model bright-square`` uses the
much lighter 640x640 bright-square graph instead, which shows what the pipeline around the model costs.

    .venv/bin/python -m bench.consumer_rate
    .venv/bin/python -m bench.consumer_rate --frames 500 --batches 8,32 --replicas 1,2 --model bright-square
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import asyncpg
import cv2
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from consumer.detector import DetectorConfig, load_detector
from shared import admin, db
from shared.broker.aio import Broker
from shared.management import Management
from shared.settings import DEFAULT_AMQP_URL, DEFAULT_DATABASE_URL, DEFAULT_MANAGEMENT_URL, AdminSettings
from shared.topology import QUEUE_BULK
from tests.support.onnx_graphs import write_bright_square_model, write_conv_head_model

SITE, CAMERA = "bench", "cam-1"
FRAME_SIZE = (640, 480)
RESULTS = Path(__file__).with_name("results") / "consumer_rate.json"
POLL_S = 0.25
EXIT_WAIT_S = 30.0  # after the last row: --exit-when-idle 1 plus the drain
console = Console(width=max(Console().width, 150))


# ---- inputs: frames and model ----------------------------------------------------------------------


def make_frames(folder: Path, count: int) -> int:
    """``count`` distinct 640x480 scenes (gradient, shapes, mild noise) as JPEG q90; returns mean bytes."""
    rng = np.random.default_rng(0)
    width, height = FRAME_SIZE
    ramp_x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    ramp_y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    sizes = []
    for index in range(count):
        tint = rng.uniform(40, 200, 3)
        image = np.empty((height, width, 3), np.float32)
        for channel in range(3):
            image[..., channel] = tint[channel] * (0.6 + 0.25 * ramp_x + 0.15 * ramp_y)
        for _ in range(int(rng.integers(3, 9))):
            x, y = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
            w, h = int(rng.integers(20, 200)), int(rng.integers(20, 160))
            colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
            cv2.rectangle(image, (x, y), (x + w, y + h), colour, -1)
        image += rng.normal(0, 6, image.shape).astype(np.float32)
        pixels = np.clip(image, 0, 255).astype(np.uint8)
        ok, encoded = cv2.imencode(".jpg", pixels, [int(cv2.IMWRITE_JPEG_QUALITY), 90])
        if not ok:
            raise SystemExit("OpenCV could not encode a JPEG")
        (folder / f"frame-{index:04d}.jpg").write_bytes(encoded.tobytes())
        sizes.append(len(encoded))
    return round(sum(sizes) / len(sizes))


def build_model(kind: str, folder: Path) -> tuple[Path, str]:
    if kind == "conv-head":
        path = write_conv_head_model(folder / "conv-head-320.onnx", input_size=(320, 320))
        return path, "synthetic conv head (YOLOv8-shaped [B, 84, 2100]), input 320x320"
    path = write_bright_square_model(folder / "bright-square-640.onnx", input_size=(640, 640))
    return path, "bright-square graph (reductions only), input 640x640"


def detect_only(model: Path, folder: Path, sizes: list[int], images: int, threads: int) -> dict[str, float]:
    """Images per second of the detector alone (letterbox, inference, postprocess) in this process, on the
    decoded frames, at each batch size: the model's ceiling on this machine with nothing else running."""
    detector = load_detector(DetectorConfig(model_path=model, device="cpu", intra_op_threads=threads))
    decoded = [image for path in sorted(folder.iterdir()) if (image := cv2.imread(str(path))) is not None]
    rates = {}
    for size in sizes:
        batch = [decoded[i % len(decoded)] for i in range(size)]
        detector.detect(batch)  # first run at this size allocates
        rounds = max(1, images // size)
        started = time.perf_counter()
        for _ in range(rounds):
            detector.detect(batch)
        rates[str(size)] = round(rounds * size / (time.perf_counter() - started), 1)
    return rates


# ---- environment: vhost, database, publishing -----------------------------------------------------------


@dataclass
class Setup:
    vhost: str
    amqp_url: str
    database_url: str
    folder: Path
    model: Path


def clean_env(**detfleet: str) -> dict[str, str]:
    """This process's environment without any DETFLEET_ variable, plus the given ones (names upper-cased)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETFLEET_")}
    env.update({f"DETFLEET_{k.upper()}": v for k, v in detfleet.items()})
    return env


async def publish(setup: Setup, frames: int) -> dict[str, Any]:
    """Publish ``frames`` to the bulk lane with ``detfleet produce`` and check the broker holds them all."""
    argv = ["-m", "detfleet", "produce", "--source", str(setup.folder), "--site", SITE, "--camera", CAMERA]
    argv += ["--lane", "bulk", "--loop", "--limit", str(frames), "--json"]
    env = clean_env(amqp_url=setup.amqp_url, log_level="WARNING")
    process = await asyncio.create_subprocess_exec(
        sys.executable, *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    if process.returncode != 0:
        raise SystemExit(f"detfleet produce failed ({process.returncode}): {stderr.decode()[-500:]}")
    summary: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    if summary["confirmed"] != frames:
        raise SystemExit(f"detfleet produce confirmed {summary['confirmed']} of {frames}")
    broker = await Broker.connect(setup.amqp_url, "bench-consumer-rate", robust=False)
    try:
        depth = await broker.queue_depth(QUEUE_BULK)
    finally:
        await broker.close()
    if depth != frames:
        raise SystemExit(f"{QUEUE_BULK} holds {depth} messages, expected {frames}")
    return summary


# ---- replicas -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Replica:
    name: str
    process: asyncio.subprocess.Process
    log: IO[bytes]
    log_path: Path
    port: int
    cpu_s: float = 0.0
    batch_histogram: dict[str, float] = field(default_factory=dict)

    def sample_cpu(self) -> None:
        """utime + stime of the process so far, from /proc (kept from the last read before it exits)."""
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            self.cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def scrape(self) -> None:
        """The detfleet_batch_size histogram from /metrics (kept from the last answer before it exits)."""
        if not self.port:
            return
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=1) as answer:
                text = answer.read().decode()
        except OSError:
            return
        for family in text_string_to_metric_families(text):
            if family.name == "detfleet_batch_size":
                self.batch_histogram = {
                    s.name.removeprefix("detfleet_batch_size") + str(s.labels.get("le", "")): s.value
                    for s in family.samples
                }

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-1500:]


def open_log(path: Path) -> IO[bytes]:
    return path.open("wb")


async def start_replica(setup: Setup, name: str, max_batch: int, args: argparse.Namespace) -> Replica:
    port = free_port() if args.scrape_metrics else 0
    env = clean_env(
        amqp_url=setup.amqp_url,
        database_url=setup.database_url,
        health_port=str(port),
        device="cpu",
        consumer_id=name,
        log_level="WARNING",
        intra_op_threads=str(args.intra_op_threads),
    )
    argv = ["-m", "detfleet", "consume", "--model", str(setup.model), "--max-batch", str(max_batch)]
    argv += ["--exit-when-idle", "1"]
    log_path = setup.folder.parent / f"{name}-b{max_batch}.log"
    log = await asyncio.to_thread(open_log, log_path)
    process = await asyncio.create_subprocess_exec(
        sys.executable, *argv, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT
    )
    return Replica(name, process, log, log_path, port)


async def stop_replicas(replicas: list[Replica]) -> None:
    for replica in replicas:
        if replica.process.returncode is None:
            replica.process.kill()
            await replica.process.wait()
        replica.log.close()


# ---- one run -------------------------------------------------------------------------------------------


class CpuClock:
    """Busy share of the whole machine (every core) between start() and stop(), from /proc/stat."""

    def __init__(self) -> None:
        self._start = self._read()
        self.busy = 0.0

    @staticmethod
    def _read() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = values[3] + values[4]
        return sum(values) - idle, sum(values)

    def stop(self) -> None:
        busy, total = self._read()
        self.busy = (busy - self._start[0]) / max(1, total - self._start[1])


async def row_count(conn: asyncpg.Connection) -> int:
    count = await conn.fetchval("SELECT count(*) FROM detfleet_results")
    return int(count)


async def consume(
    setup: Setup, conn: asyncpg.Connection, replicas: int, max_batch: int, args: argparse.Namespace
) -> tuple[list[Replica], float]:
    """Start the replicas over the backlog, wait for every row and for the replicas to exit."""
    cpu = CpuClock()
    started = [await start_replica(setup, f"bench-r{i + 1}", max_batch, args) for i in range(replicas)]
    try:
        deadline = time.monotonic() + args.run_timeout
        while await row_count(conn) < args.frames:
            await sample(started)
            if any(r.process.returncode not in (None, 0) for r in started):
                raise SystemExit("a replica failed:\n" + "\n".join(r.tail() for r in started))
            gone = all(r.process.returncode == 0 for r in started)
            if (gone or time.monotonic() > deadline) and (got := await row_count(conn)) < args.frames:
                raise SystemExit(f"only {got} of {args.frames} rows (max batch {max_batch}, {replicas} x)")
            await asyncio.sleep(POLL_S)
        cpu.stop()
        exit_deadline = time.monotonic() + EXIT_WAIT_S
        while any(r.process.returncode is None for r in started) and time.monotonic() < exit_deadline:
            await sample(started)
            await asyncio.sleep(POLL_S)
    finally:
        await stop_replicas(started)
    return started, cpu.busy


async def sample(replicas: list[Replica]) -> None:
    for replica in replicas:
        if replica.process.returncode is None:
            replica.sample_cpu()
            await asyncio.to_thread(replica.scrape)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarise(rows: list[asyncpg.Record], replicas: list[Replica], frames: int) -> dict[str, Any]:
    """Rate, latencies and formed batches, all from the rows (see the module docstring)."""
    start: datetime = min(r["received_at"] for r in rows)
    end: datetime = max(r["completed_at"] for r in rows)
    wall = (end - start).total_seconds()
    held = [(r["completed_at"] - r["received_at"]).total_seconds() * 1000 for r in rows]
    capture = [r["end_to_end_ms"] for r in rows if r["end_to_end_ms"] is not None]
    groups: dict[tuple[str, datetime, float], list[asyncpg.Record]] = defaultdict(list)
    for row in rows:
        if row["status"] == "ok" and row["inference_ms"] is not None:
            groups[(row["consumer_id"], row["completed_at"], row["inference_ms"])].append(row)
    sizes = sorted(len(g) for g in groups.values())
    per_replica: dict[str, Any] = {}
    seen = {r["consumer_id"] for r in rows}
    for replica in replicas:
        mine = [r for r in rows if r["consumer_id"] == replica.name]
        batches = [k for k in groups if k[0] == replica.name]
        per_replica[replica.name] = {
            "rows": len(mine),
            "first_received": min(r["received_at"] for r in mine).isoformat() if mine else None,
            "batches": len(batches),
            "inference_busy_s": round(sum(k[2] for k in batches) / 1000, 3),
            "cpu_s": round(replica.cpu_s, 2),
            "exit_code": replica.process.returncode,
            "metrics_batch_size": replica.batch_histogram or None,
        }
    firsts = [
        min(r["received_at"] for r in rows if r["consumer_id"] == x.name) for x in replicas if x.name in seen
    ]
    statuses: dict[str, int] = defaultdict(int)
    for row in rows:
        statuses[row["status"]] += 1
    return {
        "rows": len(rows),
        "statuses": dict(statuses),
        "wall_s": round(wall, 3),
        "tasks_per_s": round(frames / wall, 1),
        "join_lag_s": round((max(firsts) - min(firsts)).total_seconds(), 3),
        "held_ms": {"p50": round(percentile(held, 50), 1), "p95": round(percentile(held, 95), 1)},
        "capture_to_row_ms": {"p50": round(percentile(capture, 50)), "p95": round(percentile(capture, 95))},
        "row_decode_ms_mean": round(float(np.mean([r["decode_ms"] for r in rows if r["decode_ms"]])), 1),
        "row_sink_ms_mean": round(float(np.mean([r["sink_ms"] for r in rows if r["sink_ms"]])), 1),
        "batches": {
            "count": len(sizes),
            "mean": round(sum(sizes) / len(sizes), 2),
            "p50": percentile([float(s) for s in sizes], 50),
            "min": sizes[0],
            "max": sizes[-1],
            "histogram": {str(s): sizes.count(s) for s in sorted(set(sizes))},
            "inference_ms_per_batch_mean": round(sum(k[2] for k in groups) / len(groups), 1),
        },
        "per_replica": per_replica,
    }


async def one_run(
    setup: Setup, conn: asyncpg.Connection, replicas: int, max_batch: int, args: argparse.Namespace
) -> dict[str, Any]:
    await conn.execute("TRUNCATE detfleet_results")
    produced = await publish(setup, args.frames)
    finished, cpu_busy = await consume(setup, conn, replicas, max_batch, args)
    rows = await conn.fetch(
        "SELECT consumer_id, status, received_at, completed_at, end_to_end_ms, decode_ms, inference_ms,"
        " sink_ms FROM detfleet_results"
    )
    result = {"max_batch": max_batch, "replicas": replicas, "publish_per_s": produced["frames_per_s"]}
    result |= summarise(rows, finished, args.frames)
    result["machine_cpu_busy"] = round(cpu_busy, 3)
    return result


# ---- the whole bench ------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    vhost = f"detfleet-bench-{tag}"
    amqp_url = DEFAULT_AMQP_URL.rstrip("/") + "/" + vhost
    database_url = DEFAULT_DATABASE_URL.rsplit("/", 1)[0] + f"/detfleet_bench_{tag}"
    runs: list[dict[str, Any]] = []
    async with Management(DEFAULT_MANAGEMENT_URL) as api:
        await api.create_vhost(vhost)
        try:
            await api.grant(vhost, "guest")
            await admin.apply_topology(AdminSettings(amqp_url=amqp_url, database_url=database_url))
            await db.ensure_database(database_url)
            await db.migrate(database_url)
            with tempfile.TemporaryDirectory(prefix="detfleet-bench-") as scratch:
                folder = Path(scratch) / "frames"
                folder.mkdir()
                frame_bytes = make_frames(folder, args.distinct)
                model, model_text = build_model(args.model, Path(scratch))
                setup = Setup(vhost, amqp_url, database_url, folder, model)
                threads = args.intra_op_threads
                ceiling = await asyncio.to_thread(detect_only, model, folder, args.batches, 256, threads)
                console.print(f"detector alone, images/s by batch size: {ceiling}")
                console.print(f"model: {model_text}; frames: {args.frames} x 640x480 JPEG (~{frame_bytes} B)")
                conn = await db.connect(database_url)
                try:
                    for max_batch in args.batches:
                        for replicas in args.replicas:
                            runs.append(await one_run(setup, conn, replicas, max_batch, args))
                            show(runs[-1])
                finally:
                    await conn.close()
        finally:
            await db.drop_database(database_url)
            await api.delete_vhost(vhost)
    return {
        "model": model_text,
        "frames": args.frames,
        "frame": "640x480 JPEG q90",
        "frame_bytes_mean": frame_bytes,
        "cores": os.cpu_count(),
        "intra_op_threads": args.intra_op_threads,
        "batch_sizes_from": "rows grouped by (consumer_id, completed_at, inference_ms)",
        "detect_only_per_s": ceiling,
        "runs": runs,
    }


def show(run: dict[str, Any]) -> None:
    b = run["batches"]
    console.print(
        f"max batch {run['max_batch']}, {run['replicas']} replica(s): {run['tasks_per_s']} tasks/s, "
        f"{b['count']} batches, mean {b['mean']}"
    )


def table(result: dict[str, Any]) -> Table:
    out = Table(title=f"detfleet consume over a backlog of {result['frames']}: {result['model']}")
    headings: tuple[str, ...] = (
        "max batch",
        "replicas",
        "tasks/s",
        "wall s",
        "held p50/p95 ms",
        "capture→row p50/p95 s",
    )
    headings += ("batches", "size mean/p50/min-max", "infer+wait ms/batch", "detect-only img/s", "CPU busy")
    for heading in headings:
        out.add_column(heading, justify="right")
    for run in result["runs"]:
        b, held, capture = run["batches"], run["held_ms"], run["capture_to_row_ms"]
        out.add_row(
            str(run["max_batch"]),
            str(run["replicas"]),
            f"{run['tasks_per_s']:.1f}",
            f"{run['wall_s']:.2f}",
            f"{held['p50']:.0f} / {held['p95']:.0f}",
            f"{capture['p50'] / 1000:.1f} / {capture['p95'] / 1000:.1f}",
            str(b["count"]),
            f"{b['mean']:.1f} / {b['p50']:g} / {b['min']}-{b['max']}",
            f"{b['inference_ms_per_batch_mean']:.0f}",
            f"{result['detect_only_per_s'][str(run['max_batch'])]:.0f}",
            f"{run['machine_cpu_busy']:.0%}",
        )
    return out


def _sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--frames", type=int, default=1000, help="backlog published before each run")
    parser.add_argument("--batches", type=_sizes, default=[8, 32], help="max-batch settings, comma-separated")
    parser.add_argument("--replicas", type=_sizes, default=[1, 2], help="replica counts, comma-separated")
    parser.add_argument("--model", choices=("conv-head", "bright-square"), default="conv-head")
    parser.add_argument("--distinct", type=int, default=50, help="distinct frames, cycled")
    parser.add_argument("--intra-op-threads", type=int, default=0, help="DETFLEET_INTRA_OP_THREADS")
    parser.add_argument("--run-timeout", type=float, default=120.0, help="seconds one run may take")
    parser.add_argument("--scrape-metrics", action="store_true", help="also poll /metrics (binds 0.0.0.0)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args()
    started = time.monotonic()
    result = asyncio.run(bench(args))
    result["bench_seconds"] = round(time.monotonic() - started, 1)
    console.print(table(result))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"written to {args.output}")


if __name__ == "__main__":
    main()
