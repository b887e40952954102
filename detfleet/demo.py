"""``make demo``: the main job end to end on this machine.

It runs in a vhost and a database of its own (``detfleet-demo``), recreated on every run, so it never mixes
with real work: topology, migrations, two consumer replicas with the shipped detector, two cameras (a folder
of frames on the bulk lane, a short video on the realtime lane, both generated deterministically with their
ground truth), every task waited for, a summary table, annotated images, and a graceful stop (the replicas
exit by themselves once idle).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

from consumer.sink import Sink
from detfleet import accuracy, synth
from producer.publisher import AsyncPublisher
from producer.sources import SourceFrame, open_source
from shared import admin, db
from shared.broker.aio import Broker
from shared.events import ResultEvent
from shared.management import Management
from shared.settings import AdminSettings, Lane, ProducerSettings, load_settings
from shared.topology import EXCHANGE_RESULTS, vhost_of

DEMO_VHOST = "detfleet-demo"
DEMO_DATABASE = "detfleet_demo"
DEMO_SEED = 8_000_000  # far from the seeds the shipped model was trained on (models/README.md)
VIDEO_SEED = 8_100_000
OUT = Path("out/demo")
FRAMES_PER_CAMERA = 60
REPLICAS = 2
WAIT_LIMIT_S = 150  # a bound against a hang, far above the expected run time
READY_LIMIT_S = 60
HEALTH_PORTS = (18081, 18082)
EVENTS_QUEUE = "detfleet-demo.events"  # the demo's own subscriber queue, in the demo's vhost
console = Console()


@dataclass(frozen=True)
class Camera:
    lane: Lane
    name: str
    source: Path  # a folder of frames or a video file, read as a gateway would read them
    truth: list[tuple[str, tuple[synth.Box, ...]]]


@dataclass(frozen=True)
class Sent:
    name: str  # the annotated copy's file name
    body: bytes
    truth: tuple[synth.Box, ...]


def demo_urls(base: AdminSettings) -> tuple[str, str]:
    amqp = base.amqp_url.rsplit("/", 1)[0] + "/" + DEMO_VHOST
    database = base.database_url.rsplit("/", 1)[0] + "/" + DEMO_DATABASE
    return amqp, database


def make_assets(folder: Path) -> list[Camera]:
    """Deterministic frames: a folder of JPEGs for the bulk camera, a short video for the realtime one."""
    # The truth goes beside the folder, not in it: the camera sends every file of its folder.
    frames_truth = synth.write_frames(folder / "frames", seed=DEMO_SEED, count=FRAMES_PER_CAMERA)
    frames_truth = frames_truth.replace(folder / "frames.json")
    video = synth.write_video(folder / "belt.avi", seed=VIDEO_SEED, count=FRAMES_PER_CAMERA)
    return [
        Camera("bulk", "cam-bulk", folder / "frames", synth.load_ground_truth(frames_truth)),
        Camera("realtime", "cam-realtime", video, synth.load_ground_truth(video.with_suffix(".json"))),
    ]


async def reset_environment(base: AdminSettings) -> AdminSettings:
    amqp, database = demo_urls(base)
    async with Management(base.management_url) as api:
        if DEMO_VHOST in await _vhosts(api):
            await api.delete_vhost(DEMO_VHOST)
        await api.create_vhost(DEMO_VHOST)
        user = base.amqp_url.split("://", 1)[1].split(":", 1)[0]
        await api.grant(DEMO_VHOST, user)
    settings = base.model_copy(update={"amqp_url": amqp, "database_url": database})
    await admin.apply_topology(settings)
    await db.drop_database(database)
    await db.migrate(database)
    return settings


async def _vhosts(api: Management) -> set[str]:
    return {v["name"] for v in await api.request("GET", "/vhosts")}


def start_replicas(settings: AdminSettings) -> list[subprocess.Popen[bytes]]:
    """Two ``detfleet consume`` with the shipped detector; each exits 0 once the queues stay empty."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETFLEET_")}
    env |= {
        "DETFLEET_AMQP_URL": settings.amqp_url,
        "DETFLEET_DATABASE_URL": settings.database_url,
        "DETFLEET_DEVICE": "cpu",
        "DETFLEET_LOG_LEVEL": "WARNING",
        "DETFLEET_MAX_WAIT_MS": "30",
        "DETFLEET_INTRA_OP_THREADS": "1",  # two replicas share two cores (docs/fleet.md, Scaling)
    }
    command = [sys.executable, "-m", "detfleet", "consume", "--exit-when-idle", "3"]
    return [
        subprocess.Popen(
            command,
            env=env | {"DETFLEET_CONSUMER_ID": f"demo-replica-{i + 1}", "DETFLEET_HEALTH_PORT": str(port)},
            stdin=subprocess.DEVNULL,
        )
        for i, port in enumerate(HEALTH_PORTS)
    ]


def wait_until_ready(replicas: list[subprocess.Popen[bytes]]) -> None:
    """Cameras start once both replicas answer /readyz (model loaded and warmed, broker and Postgres
    reached), so the latencies shown are the fleet's, not its start-up."""
    deadline = time.monotonic() + READY_LIMIT_S
    waiting = set(HEALTH_PORTS)
    while waiting and time.monotonic() < deadline and all(r.poll() is None for r in replicas):
        waiting = {port for port in waiting if not is_ready(port)}
        time.sleep(0.2)  # polling an HTTP probe: there is no event to await across processes
    if waiting:
        raise SystemExit(f"demo: replicas on ports {sorted(waiting)} never became ready")


def is_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


async def publish_frames(settings: AdminSettings, cameras: Sequence[Camera]) -> dict[str, Sent]:
    """Both cameras at once, each on its lane, through the producer's own frame sources."""
    producer = ProducerSettings(amqp_url=settings.amqp_url, producer_name="demo-gateway")
    pending: list[tuple[asyncio.Future[uuid.UUID], Sent]] = []
    passes = [zip(one_pass(camera), camera.truth, strict=True) for camera in cameras]
    async with AsyncPublisher(producer) as publisher:
        for shot in zip(*passes, strict=True):
            for camera, (frame, (_, truth)) in zip(cameras, shot, strict=True):
                confirmed = await publisher.submit(
                    frame.body,
                    camera=camera.name,
                    site="line-1",
                    lane=camera.lane,
                    captured_at=frame.captured_at,
                )
                pending.append((confirmed, Sent(f"{len(pending):04d}-{camera.name}.jpg", frame.body, truth)))
        return {str(await confirmed): sent for confirmed, sent in pending}


def one_pass(camera: Camera) -> Iterator[SourceFrame]:
    return open_source(str(camera.source)).one_pass()


async def fetch_rows(database_url: str) -> list[dict[str, Any]]:
    sink = await Sink.open(database_url)
    try:
        return await sink.fetch_rows()
    finally:
        await sink.close()


def wait_for(replicas: list[subprocess.Popen[bytes]]) -> list[int]:
    deadline = time.monotonic() + WAIT_LIMIT_S
    codes = []
    for replica in replicas:
        try:
            codes.append(replica.wait(max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            replica.terminate()
            codes.append(replica.wait(30))
    return codes


def detections(row: dict[str, Any]) -> list[dict[str, Any]]:
    found = row["detections"]
    return json.loads(found) if isinstance(found, str) else list(found or [])


def predicted_boxes(row: dict[str, Any]) -> tuple[synth.Box, ...]:
    return tuple(as_box(d) for d in detections(row))


def as_box(found: dict[str, Any]) -> synth.Box:
    x1, y1, x2, y2 = found["box"]
    return synth.Box(found["class_id"], x1, y1, x2, y2, score=found["score"])


async def watch_events(settings: AdminSettings) -> None:
    """A queue of the demo's own on detfleet.results, as a line controller would bind (docs/results.md)."""
    broker = await Broker.connect(settings.amqp_url, "detfleet-demo", robust=False)
    try:
        await broker.bind(EXCHANGE_RESULTS, ["#"], EVENTS_QUEUE)
    finally:
        await broker.close()


async def read_events(settings: AdminSettings) -> Counter[str]:
    """The result events that reached the demo's queue, counted by routing key."""
    broker = await Broker.connect(settings.amqp_url, "detfleet-demo", robust=False)
    keys: Counter[str] = Counter()
    try:
        async with broker.reading(EVENTS_QUEUE) as reader:
            while (delivery := await reader.get(timeout=2)) is not None:
                keys[ResultEvent.from_json(delivery.envelope.body).routing_key] += 1
                await delivery.ack()
    finally:
        await broker.close()
    return keys


def summary(rows: list[dict[str, Any]], sent: dict[str, Sent], seconds: float, events: Counter[str]) -> Table:
    statuses = Counter(r["status"] for r in rows)
    latencies = [r["end_to_end_ms"] for r in rows if r["end_to_end_ms"] is not None]
    labels = Counter(d["label"] for r in rows for d in detections(r))
    scored = [r for r in rows if r["status"] == "ok"]
    scores = accuracy.score(
        [predicted_boxes(r) for r in scored],
        [sent[str(r["task_id"])].truth for r in scored],
        synth.CLASS_NAMES,
    )
    table = Table(title="detfleet demo")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in (
        ("tasks", len(rows)),
        ("ok", statuses["ok"]),
        ("failed", statuses["failed"]),
        ("shed", statuses["shed"]),
        ("frames/s", f"{len(rows) / seconds:.1f}"),
        ("p50 end-to-end ms", f"{np.percentile(latencies, 50):.0f}" if latencies else "-"),
        ("p95 end-to-end ms", f"{np.percentile(latencies, 95):.0f}" if latencies else "-"),
        *((f"detections: {label}", count) for label, count in sorted(labels.items())),
        ("precision / recall at IoU 0.5", f"{scores.precision:.3f} / {scores.recall:.3f}"),
        ("replicas", ", ".join(sorted({r["consumer_id"] for r in rows}))),
        ("result events received", events.total()),
        *((f"  events {key}", count) for key, count in sorted(events.items())),
    ):
        table.add_row(name, str(value))
    return table


def annotate(rows: list[dict[str, Any]], sent: dict[str, Sent], folder: Path) -> Path:
    """Each frame as published, with the fleet's boxes and labels drawn in one colour per class."""
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        frame = sent[str(row["task_id"])]
        image = cv2.imdecode(np.frombuffer(frame.body, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None, "the demo published this frame itself"
        for found in detections(row):
            draw_detection(image, found)
        cv2.imwrite(str(folder / frame.name), image)
    return folder


def draw_detection(image: np.ndarray, found: dict[str, Any]) -> None:
    colour = CLASS_COLOURS[found["class_id"] % len(CLASS_COLOURS)]
    x1, y1, x2, y2 = (round(v) for v in found["box"])
    cv2.rectangle(image, (x1, y1), (x2, y2), colour, 2)
    text = f"{found['label']} {found['score']:.2f}"
    (width, height), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
    top = max(0, y1 - height - 6)
    cv2.rectangle(image, (x1, top), (x1 + width + 4, top + height + 6), colour, -1)
    cv2.putText(image, text, (x1 + 2, top + height + 2), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)


CLASS_COLOURS = ((0, 200, 0), (0, 140, 255), (255, 80, 255), (255, 200, 0), (0, 230, 230))


async def prepare() -> tuple[AdminSettings, list[Camera]]:
    settings = await reset_environment(load_settings(AdminSettings))
    return settings, make_assets(OUT / "assets")


def main() -> int:
    settings, cameras = asyncio.run(prepare())
    console.print(
        f"[bold]detfleet demo[/]: vhost {vhost_of(settings.amqp_url)!r}, database {DEMO_DATABASE!r}, "
        f"frames in {(OUT / 'assets').resolve()}"
    )
    started = time.monotonic()
    asyncio.run(watch_events(settings))
    replicas = start_replicas(settings)
    try:
        wait_until_ready(replicas)
        sent = asyncio.run(publish_frames(settings, cameras))
        console.print(f"published {len(sent)} frames from 2 cameras on both lanes; waiting for every row")
        codes = wait_for(replicas)
    finally:
        for replica in replicas:
            if replica.poll() is None:
                replica.kill()
    rows = asyncio.run(fetch_rows(settings.database_url))
    seconds = (
        max(r["completed_at"] for r in rows).timestamp() - min(r["received_at"] for r in rows).timestamp()
    )
    events = asyncio.run(read_events(settings))
    console.print(summary(rows, sent, max(seconds, 1e-3), events))
    console.print(f"annotated images: {annotate(rows, sent, OUT / 'annotated').resolve()}")
    console.print(
        f"replicas stopped gracefully once idle: exit codes {codes}; wall {time.monotonic() - started:.0f} s"
    )
    missing = set(sent) - {str(r["task_id"]) for r in rows}
    if missing or any(codes):
        console.print(f"[red]{len(missing)} tasks have no row; exit codes {codes}[/]")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
