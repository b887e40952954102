"""``detfleet produce``: publish frames from a folder, an image, a video file or a stream URL.

Uses the async publisher with many publishes in flight (the fast path), shows a progress bar with the
rate on a terminal, and ends with a summary: one JSON object on stdout with ``--json``.
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
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
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

from producer.metrics import ProducerMetrics
from producer.publisher import AsyncPublisher, FrameDroppedError
from producer.sources import FrameSource, SourceFrame, frames, open_source

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
        "--deterministic-ids", action="store_true", help="task id = UUIDv5(site, camera, time)"
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

    def summary(self) -> dict[str, Any]:
        counts = self.metrics.counts()
        return {
            **counts,
            "skipped": self.skipped,
            "failed": len(self.failures),
            "unconfirmed": self.unconfirmed,
            "blocked_s": round(self.metrics.blocked_seconds, 3),
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
        with _stop_on_signals(stop):
            try:
                await _publish_all(args, source, publisher, run, progress, stop)
            finally:
                await _await_confirms(publisher, run)
                run.seconds = time.monotonic() - started
                run.skipped = source.skipped
                await publisher.close(timeout=0)


async def _publish_all(
    args: argparse.Namespace,
    source: FrameSource,
    publisher: AsyncPublisher,
    run: Run,
    progress: Progress,
    stop: asyncio.Event,
) -> None:
    pacer = Pacer(args.fps)
    async for frame in _frames(source, args.loop, args.limit):
        if stop.is_set():
            logger.info("Stopping on a signal: waiting for the confirms of what was published")
            return
        await pacer.wait()
        try:
            outcome = await publisher.submit(
                frame.body, camera=args.camera, site=args.site, lane=args.lane, captured_at=frame.captured_at
            )
        except FrameRejectedError as error:
            logger.warning("Refused %s: %s", frame.origin, error)
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
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGINT/SIGTERM stop reading the source; what was published still gets its confirms and a summary."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
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
    source = open_source(args.source, settings.jpeg_quality)
    run = Run(ProducerMetrics())
    if args.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, registry=run.metrics.registry)
    stopped_by: DetfleetError | None = None
    with Progress(sys.stderr.isatty() and not args.json, args.limit) as progress:
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
