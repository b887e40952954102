"""The drop-folder gateway (``detfleet produce --watch``) against the real broker and Postgres.

Files land while the gateway runs, while it is down and while the broker is stopped; every file must end
as exactly one row, and leave the folder only once the broker confirmed it.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import pytest

from consumer.detector.fake import FakeDetector
from producer.sources import file_key
from shared import admin
from shared.schema import frame_task_id
from shared.settings import DEFAULT_DATABASE_URL, AdminSettings
from tests.chaos.nodes import PrivateRabbit
from tests.integration.consumer_support import consumer_settings, rows_by_id, run_until_idle
from tests.integration.gateway_support import gateway
from tests.support.broker import wait_until
from tests.support.frames import jpeg_bytes, png_bytes

SITE, CAMERA = "site-a", "cam-1"
WAIT_S = 60.0  # bound against a hang


def watch_args(drop: Path, *extra: str) -> list[str]:
    return ["--source", str(drop), "--site", SITE, "--camera", CAMERA, "--watch", "--settle", "0.2", *extra]


def drop_files(drop: Path, names: range, slow: bool = False) -> dict[str, bytes]:
    """Write frames as line systems do: most written whole under a temporary name and renamed, every
    third written in place in two parts (the gateway must not take the first part)."""
    written = {}
    for index in names:
        name = f"frame-{index:03d}.{'png' if index % 4 == 0 else 'jpg'}"
        body = png_bytes(seed=index) if name.endswith("png") else jpeg_bytes(seed=index)
        if index % 3 == 0:
            with (drop / name).open("wb") as file:
                file.write(body[: len(body) // 2])
                file.flush()
                file.write(body[len(body) // 2 :])
        else:
            (drop / f".{name}.part").write_bytes(body)
            (drop / f".{name}.part").rename(drop / name)
        written[name] = body
    return written


def expected_ids(files: dict[str, bytes]) -> set[uuid.UUID]:
    return {frame_task_id(SITE, CAMERA, file_key(Path(name), body)) for name, body in files.items()}


def images_in(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("frame-*")}


async def test_files_dropped_before_during_and_between_runs_end_as_one_row_each(
    topology_settings: AdminSettings, results_db: str, tmp_path: Path
) -> None:
    drop, done = tmp_path / "drop", tmp_path / "done"
    drop.mkdir()
    files = drop_files(drop, range(0, 6))  # waiting before the gateway starts

    async with gateway(
        topology_settings.amqp_url,
        tmp_path / "first.log",
        *watch_args(drop, "--after", "move", "--done", str(done)),
    ) as first:
        await wait_until(lambda: len(images_in(done)) == 6, WAIT_S)
        files |= drop_files(drop, range(6, 12))  # while it runs
        await wait_until(lambda: len(images_in(done)) == 12, WAIT_S)
        files |= drop_files(drop, range(12, 40))
        first.process.send_signal(signal.SIGKILL)  # dies mid-stream: some confirmed, some not yet moved
        await first.process.wait()

    assert not images_in(drop) & images_in(done)
    async with gateway(
        topology_settings.amqp_url,
        tmp_path / "second.log",
        *watch_args(drop, "--after", "move", "--done", str(done)),
    ) as second:
        await wait_until(lambda: not images_in(drop), WAIT_S)
        summary = await second.stop()

    assert images_in(done) == set(files)
    assert all((done / name).read_bytes() == body for name, body in files.items())
    assert summary["failed"] == 0
    await run_until_idle(consumer_settings(topology_settings, results_db), FakeDetector())
    rows = await rows_by_id(results_db)
    assert set(rows) == expected_ids(files)
    assert {r["status"] for r in rows.values()} == {"ok"}


@pytest.mark.timeout(600)
async def test_files_dropped_while_the_broker_is_stopped_stay_until_it_confirms_them(
    private_rabbit: PrivateRabbit, results_db: str, tmp_path: Path
) -> None:
    settings = AdminSettings(
        amqp_url=private_rabbit.amqp_url,
        management_url=private_rabbit.management_url,
        database_url=DEFAULT_DATABASE_URL,
    )
    await admin.apply_topology(settings)
    drop = tmp_path / "drop"
    drop.mkdir()

    async with gateway(settings.amqp_url, tmp_path / "gateway.log", *watch_args(drop)) as running:
        files = drop_files(drop, range(0, 5))
        await wait_until(lambda: not images_in(drop), WAIT_S)

        await asyncio.to_thread(private_rabbit.stop)
        await wait_until(lambda: "Connection to the broker lost" in running.log_text(), WAIT_S)
        files |= drop_files(drop, range(5, 10))
        await wait_until(lambda: "frames are being buffered" in running.log_text(), WAIT_S)
        # Nothing can confirm them now: each one must still be there.
        assert images_in(drop) == {f"frame-{i:03d}.{'png' if i % 4 == 0 else 'jpg'}" for i in range(5, 10)}

        await asyncio.to_thread(private_rabbit.start)
        await wait_until(lambda: not images_in(drop), 2 * WAIT_S)
        summary = await running.stop()

    assert summary["finished"] == 10
    assert summary["failed"] == 0
    await run_until_idle(consumer_settings(settings, results_db), FakeDetector())
    rows = await rows_by_id(results_db)
    assert set(rows) == expected_ids(files)
    assert {r["status"] for r in rows.values()} == {"ok"}
