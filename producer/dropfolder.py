"""The drop-folder gateway: ``detfleet produce --source DIR --watch``.

Line cameras (or the FTP server older line systems write to) drop image files into a folder. Each file is
published once it is completely written, and only after the broker confirmed it is it removed or moved to
a done folder (``--after``). What is not confirmed stays where it is:

- a file still being written waits: it is taken only once its size and modification time have stood still
  for ``settle_s`` and it holds a whole JPEG or PNG (the end marker is there); names that FTP servers and
  uploaders use while a transfer runs (``.name``, ``*.part``, ``*.tmp``, ``*.filepart``) are never taken;
- a file the broker refuses (bulk lane full past the retries, unroutable, broker away for too long) stays
  and is tried again after a backoff;
- a file that is not an image or breaks the frame limits stays, with one warning, until it changes;
- a realtime frame dropped on purpose (its deadline passed) stays, with one warning, until it changes.

Task ids come from the file's path under the folder and its content, so a restart (or a file confirmed but
not yet removed when the gateway died) publishes nothing twice: the consumers absorb the resend as a
redelivery. ``captured_at`` is the file's modification time. New files are found through watchfiles
(inotify on Linux); a slow full rescan (:data:`RESCAN_S`) is the safety net for what a watcher can miss (an
overflowing event queue, files landed before the watch was armed, network filesystems).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from watchfiles import Change, awatch

from producer.publisher import AsyncPublisher, FrameRefusedError, log_ids
from producer.sources import file_key, is_accepted_image
from shared.errors import DetfleetError, FrameDroppedError, FrameRejectedError
from shared.frames import is_complete_image
from shared.schema import frame_task_id
from shared.settings import Lane

logger = logging.getLogger(__name__)
# watchfiles logs every batch of changes at INFO: one line per file dropped says nothing ours do not.
logging.getLogger("watchfiles").setLevel(logging.WARNING)

After = Literal["remove", "move"]
# Names of files still on their way in: dot files (ProFTPD's HiddenStores, pure-ftpd, rsync) and the
# suffixes that uploaders write to before renaming.
PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".filepart", ".crdownload", "~")
RESCAN_S = 30.0
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0
WATCH_STEP_MS = 50
WATCH_DEBOUNCE_MS = 400


@dataclass
class _Pending:
    """A file seen and not yet published: its state when seen, and when to look at it next."""

    size: int
    mtime_ns: int
    seen_at: float
    due_at: float = 0.0
    failures: int = 0


@dataclass
class _Stamp:
    size: int
    mtime_ns: int


@dataclass
class DropCounts:
    """What the drop folder did, for the run's summary."""

    finished: int = 0
    left: int = 0
    retried: int = 0
    skipped_files: set[Path] = field(default_factory=set)


@dataclass(frozen=True)
class Camera:
    site: str
    camera: str
    lane: Lane


class DropFolder:
    """Watches ``root`` and publishes every complete image file in it through ``publisher``."""

    def __init__(
        self,
        root: Path,
        publisher: AsyncPublisher,
        camera: Camera,
        *,
        after: After = "remove",
        done_dir: Path | None = None,
        settle_s: float = 1.0,
    ) -> None:
        if after == "move" and done_dir is None:
            raise ValueError("moving published files needs a done folder")
        self.root = root.resolve()
        self.done_dir = done_dir.resolve() if done_dir is not None else None
        self.after = after
        self.settle_s = settle_s
        self.counts = DropCounts()
        self._publisher = publisher
        self._camera = camera
        self._pending: dict[Path, _Pending] = {}
        self._in_flight: dict[Path, tuple[_Stamp, asyncio.Future[uuid.UUID]]] = {}
        # Files left alone until they change: not images, refused, dropped on purpose.
        self._parked: dict[Path, _Stamp] = {}
        self._wake = asyncio.Event()

    @property
    def skipped(self) -> int:
        return len(self.counts.skipped_files)

    async def run(self, stop: asyncio.Event, limit: int | None = None) -> None:
        """Publish until ``stop`` is set (or ``limit`` files are finished); then wait for the confirms of
        what is in flight, as long as one publish may take, and finish those files."""
        watching = asyncio.Event()
        watcher = asyncio.create_task(self._watch(watching), name="detfleet-drop-watch")
        rescan_at = 0.0
        try:
            while not stop.is_set() and not (limit is not None and self.counts.finished >= limit):
                # Cleared before looking: an event from here on wakes the sleep below at once.
                self._wake.clear()
                if time.monotonic() >= rescan_at:
                    self._note_all(p for p in self.root.rglob("*") if p.is_file())
                    rescan_at = time.monotonic() + RESCAN_S
                await self._publish_due(limit)
                await self._sleep(stop, min(self._next_due(), rescan_at) - time.monotonic())
        finally:
            watching.set()
            await self._drain()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    # -- finding files -----------------------------------------------------------------------------------

    async def _watch(self, stop: asyncio.Event) -> None:
        async for changes in awatch(
            self.root, stop_event=stop, step=WATCH_STEP_MS, debounce=WATCH_DEBOUNCE_MS, recursive=True
        ):
            self._note_all(Path(path) for change, path in changes if change != Change.deleted)
            for change, path in changes:
                if change == Change.deleted:
                    self._pending.pop(Path(path), None)
                    self._parked.pop(Path(path), None)
            self._wake.set()

    def _note_all(self, paths: Iterable[Path]) -> None:
        for path in paths:
            self._note(path)

    def _note(self, path: Path) -> None:
        if not self._wanted(path) or path in self._in_flight:
            return
        try:
            stat = path.stat()
        except OSError:  # gone again, or not a plain file any more
            self._pending.pop(path, None)
            return
        stamp = _Stamp(stat.st_size, stat.st_mtime_ns)
        if self._parked.get(path) == stamp:
            return
        self._parked.pop(path, None)
        pending = self._pending.get(path)
        if pending is None or (pending.size, pending.mtime_ns) != (stamp.size, stamp.mtime_ns):
            self._pending[path] = _Pending(stamp.size, stamp.mtime_ns, time.monotonic())

    def _wanted(self, path: Path) -> bool:
        if self.done_dir is not None and path.is_relative_to(self.done_dir):
            return False
        name = path.name
        return not name.startswith(".") and not name.endswith(PARTIAL_SUFFIXES) and path.is_file()

    # -- publishing --------------------------------------------------------------------------------------

    async def _publish_due(self, limit: int | None) -> None:
        now = time.monotonic()
        due = [p for p, pending in self._pending.items() if pending.due_at <= now and self._settled(pending)]
        for path in sorted(due, key=lambda p: (self._pending[p].mtime_ns, p)):
            if limit is not None and self.counts.finished + len(self._in_flight) >= limit:
                return
            pending = self._pending.get(path)
            if pending is not None:
                await self._publish(path, pending)

    def _settled(self, pending: _Pending) -> bool:
        """Unchanged for ``settle_s``: by its modification time, or since first seen (a clock off)."""
        age_s = time.time() - pending.mtime_ns / 1e9
        return age_s >= self.settle_s or time.monotonic() - pending.seen_at >= self.settle_s

    async def _publish(self, path: Path, pending: _Pending) -> None:
        body = self._read_whole(path, pending)
        if body is None:
            return
        stamp = _Stamp(pending.size, pending.mtime_ns)
        key = file_key(path.relative_to(self.root), body)
        try:
            outcome = await self._publisher.submit(
                body,
                camera=self._camera.camera,
                site=self._camera.site,
                lane=self._camera.lane,
                captured_at=datetime.fromtimestamp(pending.mtime_ns / 1e9, UTC),
                key=key,
            )
        except FrameRejectedError as error:
            extra = log_ids(error.task) if isinstance(error, FrameRefusedError) else {}
            self._park(path, stamp, f"refused: {error}", extra)
            return
        except DetfleetError as error:
            self._retry_later(path, pending, f"not accepted for publishing: {error}", self._ids(key))
            return
        del self._pending[path]
        self._in_flight[path] = (stamp, outcome)
        outcome.add_done_callback(lambda done: self._confirmed(path, stamp, pending, key, done))

    def _read_whole(self, path: Path, pending: _Pending) -> bytes | None:
        """The file's bytes when it holds a whole image and is still as it was when seen, else None."""
        try:
            body = path.read_bytes()
            stat = path.stat()
        except OSError:
            self._pending.pop(path, None)
            return None
        if (stat.st_size, stat.st_mtime_ns) != (pending.size, pending.mtime_ns):
            self._pending[path] = _Pending(stat.st_size, stat.st_mtime_ns, time.monotonic())
            return None
        if not is_accepted_image(body[:8]):
            self.counts.skipped_files.add(path)
            self._park(path, _Stamp(pending.size, pending.mtime_ns), "not a JPEG or PNG image", {})
            return None
        if not is_complete_image(body):
            # Still arriving (a transfer that stalled longer than settle_s): look again later.
            pending.due_at = time.monotonic() + self.settle_s
            return None
        return body

    def _confirmed(
        self, path: Path, stamp: _Stamp, pending: _Pending, key: str, outcome: asyncio.Future[uuid.UUID]
    ) -> None:
        self._in_flight.pop(path, None)
        self._wake.set()
        if outcome.cancelled():
            self._pending[path] = pending
            return
        error = outcome.exception()
        if isinstance(error, FrameDroppedError):
            self._park(path, stamp, f"dropped: {error}", self._ids(key))
        elif error is not None:
            self._retry_later(path, pending, f"not confirmed: {error}", self._ids(key))
        else:
            self._finish(path, stamp, outcome.result())

    def _finish(self, path: Path, stamp: _Stamp, task_id: uuid.UUID) -> None:
        """Remove or move a confirmed file, unless it changed since it was read (then it is new work)."""
        try:
            stat = path.stat()
        except OSError:
            self.counts.finished += 1  # removed by someone else; it was confirmed all the same
            return
        if (stat.st_size, stat.st_mtime_ns) != (stamp.size, stamp.mtime_ns):
            self._note(path)
            return
        try:
            self._remove_or_move(path, task_id)
        except OSError as error:
            logger.warning("Published %s but could not %s it: %s", path, self.after, error)
            self._parked[path] = stamp
            return
        self.counts.finished += 1
        logger.debug("Published %s", path, extra={"task_id": str(task_id), "trace_id": task_id.hex})

    def _remove_or_move(self, path: Path, task_id: uuid.UUID) -> None:
        if self.after == "remove" or self.done_dir is None:
            path.unlink(missing_ok=True)
            return
        target = self.done_dir / path.relative_to(self.root)
        if target.exists():  # the same name dropped again: keep both
            target = target.with_name(f"{target.stem}.{task_id.hex[:12]}{target.suffix}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target)

    def _park(self, path: Path, stamp: _Stamp, why: str, extra: dict[str, str]) -> None:
        self._pending.pop(path, None)
        self._parked[path] = stamp
        self.counts.left += 1
        logger.warning("Leaving %s in place until it changes: %s", path, why, extra=extra)

    def _retry_later(self, path: Path, pending: _Pending, why: str, extra: dict[str, str]) -> None:
        pending.failures += 1
        delay = min(RETRY_FIRST_S * 2 ** (pending.failures - 1), RETRY_MAX_S)
        pending.due_at = time.monotonic() + delay
        self._pending[path] = pending
        self.counts.retried += 1
        logger.warning("Keeping %s, next try in %.0f s: %s", path, delay, why, extra=extra)

    def _ids(self, key: str) -> dict[str, str]:
        # The publisher's trace id of a frame without its own is its task id's hex.
        task_id = frame_task_id(self._camera.site, self._camera.camera, key)
        return {"task_id": str(task_id), "trace_id": task_id.hex}

    # -- waiting -------------------------------------------------------------------------------------------

    def _next_due(self) -> float:
        """When the next pending file may be ready: its due time, or when it will have settled."""
        soonest = float("inf")
        now_wall, now = time.time(), time.monotonic()
        for pending in self._pending.values():
            settled_at = min(
                now + max(0.0, pending.mtime_ns / 1e9 + self.settle_s - now_wall),
                pending.seen_at + self.settle_s,
            )
            soonest = min(soonest, max(pending.due_at, settled_at))
        return soonest

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        """Until a file event, ``stop``, or ``seconds`` (the next file due)."""
        if seconds <= 0:
            return
        waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    async def _drain(self) -> None:
        """Wait for the confirms of the files in flight, as long as one publish may take."""
        outcomes = [outcome for _, outcome in self._in_flight.values()]
        if outcomes:
            await asyncio.wait(outcomes, timeout=self._publisher.confirm_wait_s())
