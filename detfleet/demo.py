"""``make demo``: the main job end to end on this machine.

It runs in a vhost and a database of its own (``detfleet-demo``), recreated on every run, so it never mixes
with real work: topology, migrations, two consumer replicas, frames published on both lanes, every task
waited for, a summary table, annotated images, and a graceful stop (the replicas exit when idle).

Until the trained detector ships, the demo uses a stand-in ONNX model that boxes the bright objects on the
belt; it runs through exactly the same detector code as any YOLOv8/YOLO11 export.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

from consumer.sink import Sink
from producer.publisher import AsyncPublisher
from shared import admin, db
from shared.management import Management
from shared.settings import AdminSettings, Lane, ProducerSettings, load_settings
from shared.topology import vhost_of

DEMO_VHOST = "detfleet-demo"
DEMO_DATABASE = "detfleet_demo"
OUT = Path("out/demo")
FRAMES_PER_CAMERA = 60
REPLICAS = 2
WAIT_LIMIT_S = 150  # a bound against a hang, far above the expected run time
console = Console()


def demo_urls(base: AdminSettings) -> tuple[str, str]:
    amqp = base.amqp_url.rsplit("/", 1)[0] + "/" + DEMO_VHOST
    database = base.database_url.rsplit("/", 1)[0] + "/" + DEMO_DATABASE
    return amqp, database


def belt_frame(index: int, width: int = 640, height: int = 480) -> tuple[bytes, tuple[int, int, int, int]]:
    """A dark, textured belt with one bright part on it; returns the JPEG and the part's true box."""
    rng = np.random.default_rng(index)
    belt = rng.normal(60, 12, (height, width, 3)).clip(0, 255).astype(np.uint8)
    w, h = int(rng.integers(40, 160)), int(rng.integers(30, 120))
    x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
    cv2.rectangle(belt, (x, y), (x + w - 1, y + h - 1), (255, 255, 255), thickness=-1)
    ok, data = cv2.imencode(".jpg", belt, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return bytes(data), (x, y, x + w, y + h)


def stand_in_model(path: Path) -> Path:
    from tests.support.onnx_graphs import write_bright_square_model  # dev extra: onnx

    return write_bright_square_model(path, names=("part", "foreign_object"), input_size=(320, 320))


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


def start_replicas(settings: AdminSettings, model: Path) -> list[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETFLEET_")}
    env |= {
        "DETFLEET_AMQP_URL": settings.amqp_url,
        "DETFLEET_DATABASE_URL": settings.database_url,
        "DETFLEET_DEVICE": "cpu",
        "DETFLEET_LOG_LEVEL": "WARNING",
        "DETFLEET_MAX_WAIT_MS": "30",
    }
    replicas = []
    for index in range(REPLICAS):
        env_i = env | {"DETFLEET_HEALTH_PORT": "0", "DETFLEET_CONSUMER_ID": f"demo-replica-{index + 1}"}
        command = [
            sys.executable,
            "-m",
            "detfleet",
            "consume",
            "--model",
            str(model),
            "--exit-when-idle",
            "3",
        ]
        replicas.append(subprocess.Popen(command, env=env_i, stdin=subprocess.DEVNULL))
    return replicas


async def publish_frames(settings: AdminSettings) -> dict[str, tuple[int, int, int, int]]:
    """Both lanes, one camera each; returns the true box of every task id."""
    producer = ProducerSettings(amqp_url=settings.amqp_url, producer_name="demo-gateway")
    pending = []
    async with AsyncPublisher(producer) as publisher:
        for index in range(FRAMES_PER_CAMERA * 2):
            lane: Lane = "realtime" if index % 2 else "bulk"
            body, box = belt_frame(index)
            (OUT / "frames" / f"{index:04d}.jpg").write_bytes(body)
            confirmed = await publisher.submit(body, camera=f"cam-{lane}", site="line-1", lane=lane)
            pending.append((confirmed, box))
        return {str(await confirmed): box for confirmed, box in pending}


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


def summary(rows: list[dict[str, Any]], seconds: float) -> Table:
    statuses = Counter(r["status"] for r in rows)
    latencies = sorted(r["end_to_end_ms"] for r in rows if r["end_to_end_ms"] is not None)
    labels = Counter(d["label"] for r in rows for d in _detections(r))
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
        ("replicas", ", ".join(sorted({r["consumer_id"] for r in rows}))),
    ):
        table.add_row(name, str(value))
    return table


def _detections(row: dict[str, Any]) -> list[dict[str, Any]]:
    found = row["detections"]
    return json.loads(found) if isinstance(found, str) else list(found or [])


def annotate(rows: list[dict[str, Any]], frames: dict[str, int]) -> Path:
    folder = OUT / "annotated"
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        index = frames[str(row["task_id"])]
        image = cv2.imread(str(OUT / "frames" / f"{index:04d}.jpg"))
        assert image is not None, "the demo wrote this frame itself"
        for found in _detections(row):
            x1, y1, x2, y2 = (round(v) for v in found["box"])
            cv2.rectangle(image, (x1, y1), (x2, y2), (0, 200, 0), 2)
            text = f"{found['label']} {found['score']:.2f}"
            cv2.putText(image, text, (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 200, 0), 1)
        cv2.imwrite(str(folder / f"{index:04d}.jpg"), image)
    return folder


async def prepare() -> tuple[AdminSettings, Path]:
    settings = await reset_environment(load_settings(AdminSettings))
    (OUT / "frames").mkdir(parents=True, exist_ok=True)
    return settings, stand_in_model(OUT / "stand-in-model.onnx")


def main() -> int:
    settings, model = asyncio.run(prepare())
    console.print(
        f"[bold]detfleet demo[/]: vhost {vhost_of(settings.amqp_url)!r}, database {DEMO_DATABASE!r}"
    )
    started = time.monotonic()
    replicas = start_replicas(settings, model)
    try:
        truth = asyncio.run(publish_frames(settings))
        console.print(f"published {len(truth)} frames on both lanes; waiting for every row")
        codes = wait_for(replicas)
    finally:
        for replica in replicas:
            if replica.poll() is None:
                replica.kill()
    seconds = time.monotonic() - started
    rows = asyncio.run(fetch_rows(settings.database_url))
    console.print(summary(rows, seconds))
    frames = {task_id: index for index, task_id in enumerate(truth)}
    folder = annotate(rows, frames)
    console.print(f"annotated images: {folder.resolve()}")
    console.print(
        f"replicas stopped gracefully: exit codes {codes}; finished {datetime.now(UTC):%H:%M:%S} UTC"
    )
    missing = set(truth) - {str(r["task_id"]) for r in rows}
    if missing or any(codes):
        console.print(f"[red]{len(missing)} tasks have no row; exit codes {codes}[/]")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
