"""``detfleet produce``: publish frames from a folder, an image, a video file or a stream URL.

Uses the async publisher with many publishes in flight (the fast path), shows a progress bar with the
rate on a terminal, and ends with a summary: one JSON object on stdout with ``--json``. With ``--watch`` a
folder is a drop folder (producer.dropfolder): files are published as they arrive and removed (or moved)
once confirmed, until a signal stops the command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.progress import Task as ProgressTask
from rich.text import Text

from shared.errors import DetfleetError, FrameRejectedError, TaskValidationError
from shared.logs import configure_logging
from shared.schema import routing_key
from shared.settings import ProducerSettings, load_settings

# OpenCV's FFmpeg backend prints its own complaints about unreadable files; ours is the one line that counts.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")

from producer.dropfolder import Camera, DropFolder
from producer.metrics import ProducerMetrics
from producer.publisher import AsyncPublisher, FrameDroppedError, FrameRefusedError, log_ids
from producer.sources import FolderSource, FrameSource, SourceError, SourceFrame, frames, open_source

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detfleet produce", description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="folder, image, video file, or rtsp:// / http:// URL")
    parser.add_argument("--site", required=True, help="site name, [A-Za-z0-9_-]{1,64}")
    parser.add_argument("--camera", required=True, help="camera id, [A-Za-z0-9_-]{1,64}")
    parser.add_argument("--lane", choices=("realtime", "bulk"), help="default: DETFLEET_LANE (bulk)")
    parser.add_argument("--fps", type=_positive_float, help="publish at most this many frames a second")
    parser.add_argument("--limit", type=_positive_int, help="stop after this many frames")
    parser.add_argument("--loop", action="store_true", help="start the source again when it ends")
    parser.add_argument(
        "--deterministic-ids",
        action="store_true",
        help="task id from the frame's identity (file path and content, video frame index, stream time)",
    )
    parser.add_argument(
        "--watch", action="store_true", help="drop folder: publish files as they arrive (ids are stable)"
    )
    parser.add_argument(
        "--after",
        choices=("remove", "move"),
        default="remove",
        help="--watch: what becomes of a confirmed file (move: into --done)",
    )
    parser.add_argument("--done", type=Path, help="--watch --after move: folder for confirmed files")
    parser.add_argument(
        "--settle",
        type=_positive_float,
        default=1.0,
        help="--watch: seconds a file must stand still before it is taken (default 1)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    return parser


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


@dataclass
class Run:
    """What one ``produce`` run did: the publisher's counts plus the source's and the clock's."""

    metrics: ProducerMetrics
    skipped: int = 0
    seconds: float = 0.0
    unconfirmed: int = 0
    failures: list[BaseException] = field(default_factory=list)
    #: The source's own figures: a stream's gaps, a drop folder's finished and left files.
    source: dict[str, float | int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        counts = self.metrics.counts()
        return {
            **counts,
            "skipped": self.skipped,
            "failed": len(self.failures),
            "unconfirmed": self.unconfirmed,
            "blocked_s": round(self.metrics.blocked_seconds, 3),
            **self.source,
            "seconds": round(self.seconds, 3),
            "frames_per_s": round(counts["confirmed"] / self.seconds, 1) if self.seconds > 0 else 0.0,
        }

    def record(self, outcome: asyncio.Future[uuid.UUID]) -> None:
        if outcome.cancelled():
            return
        error = outcome.exception()
        # Realtime drops are deliberate and counted; anything else that did not confirm is a failure.
        if error is not None and not isinstance(error, FrameDroppedError):
            self.failures.append(error)


class Pacer:
    """Holds a loop to at most ``fps`` iterations a second (none without a cap)."""

    def __init__(self, fps: float | None) -> None:
        self._interval = 1.0 / fps if fps else 0.0
        self._next_at = time.monotonic()

    async def wait(self) -> None:
        if not self._interval:
            return
        now = time.monotonic()
        if self._next_at > now:
            await asyncio.sleep(self._next_at - now)
        self._next_at = max(self._next_at, now) + self._interval


async def _frames(source: FrameSource, loop: bool, limit: int | None) -> AsyncIterator[SourceFrame]:
    """The source's frames; decoding sources run in a thread so confirms keep flowing meanwhile."""
    iterator: Iterator[SourceFrame] = frames(source, loop)
    count = 0
    while limit is None or count < limit:
        frame = await asyncio.to_thread(next, iterator, None) if source.heavy else next(iterator, None)
        if frame is None:
            return
        count += 1
        yield frame


async def produce(
    args: argparse.Namespace, settings: ProducerSettings, source: FrameSource, run: Run, progress: Progress
) -> None:
    """Publish every frame, wait for their confirms, and fill in ``run``."""
    stop = asyncio.Event()
    async with AsyncPublisher(
        settings, metrics=run.metrics, deterministic_ids=args.deterministic_ids
    ) as publisher:
        # The clock starts once connected: seconds and frames/s measure publishing, not start-up.
        started = time.monotonic()
        with _stop_on_signals(lambda: _stop(stop, source)):
            try:
                if args.watch:
                    await _watch_folder(args, publisher, run, stop)
                else:
                    await _publish_all(args, source, publisher, run, progress, stop)
            finally:
                source.close()
                await asyncio.to_thread(source.wait_closed)
                await _await_confirms(publisher, run)
                run.seconds = time.monotonic() - started
                run.skipped += source.skipped
                run.source.update(source.stats())
                await publisher.close(timeout=0)


def _stop(stop: asyncio.Event, source: FrameSource) -> None:
    stop.set()
    source.close()  # a live stream may be waiting for its next frame


async def _watch_folder(
    args: argparse.Namespace, publisher: AsyncPublisher, run: Run, stop: asyncio.Event
) -> None:
    folder = DropFolder(
        Path(args.source),
        publisher,
        Camera(args.site, args.camera, args.lane),
        after=args.after,
        done_dir=args.done,
        settle_s=args.settle,
    )
    try:
        await folder.run(stop, args.limit)
    finally:
        run.skipped = folder.skipped
        run.source.update({"finished": folder.counts.finished, "left": folder.counts.left})


async def _publish_all(
    args: argparse.Namespace,
    source: FrameSource,
    publisher: AsyncPublisher,
    run: Run,
    progress: Progress,
    stop: asyncio.Event,
) -> None:
    # A live stream keeps its own pace and hands over its freshest frame at each tick.
    pacer = Pacer(None if source.paces_itself else args.fps)
    async for frame in _frames(source, args.loop, args.limit):
        if stop.is_set():
            logger.info("Stopping on a signal: waiting for the confirms of what was published")
            return
        await pacer.wait()
        try:
            outcome = await publisher.submit(
                frame.body,
                camera=args.camera,
                site=args.site,
                lane=args.lane,
                captured_at=frame.captured_at,
                key=frame.key if args.deterministic_ids else None,
            )
        except FrameRejectedError as error:
            extra = log_ids(error.task) if isinstance(error, FrameRefusedError) else {}
            logger.warning("Refused %s: %s", frame.origin, error, extra=extra)
            continue
        outcome.add_done_callback(run.record)
        if progress.enabled:
            outcome.add_done_callback(progress.advance)


async def _await_confirms(publisher: AsyncPublisher, run: Run) -> None:
    """Wait for the outstanding confirms as long as one publish may take; count what is left."""
    with contextlib.suppress(DetfleetError):
        await publisher.flush(publisher.confirm_wait_s())
    run.unconfirmed = publisher.unconfirmed


@contextlib.contextmanager
def _stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """SIGINT/SIGTERM stop reading the source; what was published still gets its confirms and a summary."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(sig, stop)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


class Progress:
    """A rich progress bar with the confirm rate on a terminal; nothing otherwise."""

    def __init__(self, enabled: bool, total: int | None) -> None:
        self._bar: RichProgress | None = None
        self._task = TaskID(0)
        if enabled:
            self._bar, self._task = _rich_bar(total)

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    @property
    def enabled(self) -> bool:
        return self._bar is not None

    def advance(self, _: object = None) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)


class _RateColumn(ProgressColumn):
    def render(self, task: ProgressTask) -> Text:
        rate = f"{task.speed:,.1f}" if task.speed else "-"
        return Text(f"{rate} frames/s", style="progress.data.speed")


def _rich_bar(total: int | None) -> tuple[RichProgress, TaskID]:
    bar = RichProgress(
        TextColumn("confirmed"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    return bar, bar.add_task("produce", total=total)


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary), flush=True)
        return
    parts = [f"{key} {value}" for key, value in summary.items() if key not in ("seconds", "frames_per_s")]
    print(
        "  ".join(parts) + f"  in {summary['seconds']:.2f} s: {summary['frames_per_s']:.1f} frames/s",
        flush=True,
    )


def _check_watch(args: argparse.Namespace, source: FrameSource) -> None:
    """--watch takes a folder and never loops; moving needs a done folder."""
    if args.watch and not isinstance(source, FolderSource):
        raise SourceError(f"{args.source}: --watch needs a folder")
    if args.watch and args.loop:
        raise SourceError("--watch publishes each file once: it does not take --loop")
    if args.after == "move" and args.done is None:
        raise SourceError("--after move needs --done FOLDER")


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    settings = load_settings(ProducerSettings)
    args.lane = args.lane or settings.lane
    try:
        routing_key(args.lane, args.site, args.camera)
    except ValueError as error:
        raise TaskValidationError(str(error)) from None
    configure_logging(settings.log_level, settings.log_json)
    run = Run(ProducerMetrics())
    source = open_source(args.source, settings.jpeg_quality, args.fps, run.metrics.stream_gap)
    _check_watch(args, source)
    if args.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, registry=run.metrics.registry)
    stopped_by: DetfleetError | None = None
    # A drop folder has no end to count towards: no bar, its log and summary tell.
    with Progress(sys.stderr.isatty() and not args.json and not args.watch, args.limit) as progress:
        try:
            asyncio.run(produce(args, settings, source, run, progress))
        except DetfleetError as error:
            stopped_by = error
    if stopped_by is None or run.metrics.counts()["published"]:
        _print_summary(run.summary(), args.json)
    if stopped_by is not None:
        raise stopped_by
    if run.failures:
        raise run.failures[0]
    return 0
