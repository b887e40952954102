"""The drop folder against a fake publisher: what is taken, when, and what becomes of each file."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from producer.dropfolder import Camera, DropFolder
from producer.publisher import AsyncPublisher
from shared.errors import PublishNackedError
from shared.frames import is_complete_image
from tests.support.broker import wait_until
from tests.support.frames import jpeg_bytes, png_bytes

CAMERA = Camera("site-a", "cam-1", "bulk")


class FakePublisher:
    """Records every submit and leaves its outcome to the test."""

    def __init__(self) -> None:
        self.submitted: list[tuple[bytes, dict[str, Any], asyncio.Future[uuid.UUID]]] = []

    async def submit(self, frame: bytes, **fields: Any) -> asyncio.Future[uuid.UUID]:
        outcome: asyncio.Future[uuid.UUID] = asyncio.get_running_loop().create_future()
        self.submitted.append((frame, fields, outcome))
        return outcome

    def confirm_wait_s(self) -> float:
        return 1.0

    def bodies(self) -> list[bytes]:
        return [body for body, _, _ in self.submitted]


@pytest.fixture
def publisher() -> FakePublisher:
    return FakePublisher()


@pytest.fixture
async def running(tmp_path: Path, publisher: FakePublisher) -> AsyncIterator[DropFolder]:
    drop = tmp_path / "drop"
    drop.mkdir()
    folder = DropFolder(
        drop, cast(AsyncPublisher, publisher), CAMERA, after="move", done_dir=drop / "done", settle_s=0.05
    )
    stop = asyncio.Event()
    task = asyncio.create_task(folder.run(stop))
    yield folder
    stop.set()
    await asyncio.wait_for(task, 10)


def test_an_image_is_complete_only_once_its_end_marker_is_written() -> None:
    jpeg, png = jpeg_bytes(seed=1), png_bytes(seed=1)
    assert is_complete_image(jpeg)
    assert is_complete_image(jpeg + b"\x00\x00")
    assert is_complete_image(png)
    assert not is_complete_image(jpeg[: len(jpeg) // 2])
    assert not is_complete_image(png[:-4])
    assert not is_complete_image(b"GIF89a")


async def test_a_file_is_moved_only_after_its_confirm(running: DropFolder, publisher: FakePublisher) -> None:
    body = jpeg_bytes(seed=2)
    (running.root / "a.jpg").write_bytes(body)

    await wait_until(lambda: len(publisher.submitted) == 1)
    _, fields, outcome = publisher.submitted[0]
    assert (running.root / "a.jpg").exists()
    assert fields["key"].startswith("file:a.jpg:")
    assert fields["captured_at"].timestamp() == pytest.approx((running.root / "a.jpg").stat().st_mtime)

    outcome.set_result(uuid.uuid4())
    await wait_until(lambda: (running.root / "done" / "a.jpg").exists())
    assert not (running.root / "a.jpg").exists()
    assert (running.root / "done" / "a.jpg").read_bytes() == body
    assert running.counts.finished == 1


async def test_a_refused_file_stays_and_is_tried_again(running: DropFolder, publisher: FakePublisher) -> None:
    (running.root / "b.png").write_bytes(png_bytes(seed=3))
    await wait_until(lambda: len(publisher.submitted) == 1)

    publisher.submitted[0][2].set_exception(PublishNackedError("bulk queue full"))
    await wait_until(lambda: len(publisher.submitted) == 2)
    assert (running.root / "b.png").exists()
    assert publisher.submitted[1][1]["key"] == publisher.submitted[0][1]["key"]

    publisher.submitted[1][2].set_result(uuid.uuid4())
    await wait_until(lambda: (running.root / "done" / "b.png").exists())


async def test_a_file_still_being_written_or_under_a_temporary_name_is_not_taken(
    running: DropFolder, publisher: FakePublisher
) -> None:
    body = jpeg_bytes(seed=4)
    (running.root / "c.jpg.part").write_bytes(body)
    (running.root / ".d.jpg").write_bytes(body)
    with (running.root / "e.jpg").open("wb") as file:
        file.write(body[:100])
        file.flush()
        (running.root / "c.jpg.part").rename(running.root / "c.jpg")
        await wait_until(lambda: len(publisher.submitted) == 1)
        file.write(body[100:])

    await wait_until(lambda: len(publisher.submitted) == 2)
    assert publisher.bodies() == [body, body]
    assert sorted(f["key"].split(":")[1] for _, f, _ in publisher.submitted) == ["c.jpg", "e.jpg"]
    assert (running.root / ".d.jpg").exists()


async def test_a_file_that_is_not_an_image_is_left_and_counted_once(
    running: DropFolder, publisher: FakePublisher
) -> None:
    (running.root / "notes.txt").write_text("not a frame")
    (running.root / "f.jpg").write_bytes(jpeg_bytes(seed=5))

    await wait_until(lambda: len(publisher.submitted) == 1 and running.skipped == 1)
    assert (running.root / "notes.txt").exists()
    assert running.counts.left == 1
