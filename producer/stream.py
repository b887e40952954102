"""A live camera stream (RTSP, MJPEG over HTTP, ...) read at its own pace, published at ``--fps``.

A live stream does not wait for its reader: frames it sends while nobody reads pile up in the socket and
the decoder, so a reader that reads only at the publish rate sees each frame staler than the last. A
grabber thread therefore takes every frame as the stream sends it and stamps its capture time at the grab;
the publishing side asks for a frame at each tick of ``--fps`` (at once without it) and gets the first one
grabbed after asking, so a published frame is never older than one frame interval of the stream. Frames
grabbed while nobody asked are never decoded into pixels (``grab`` without ``retrieve``).

A stream that is lost (a camera reboots, the network drops) is reopened with a backoff that doubles up to
:data:`RECONNECT_MAX_S`; every gap is counted and its length measured. Only the first open fails the
command, so a wrong URL is reported at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import cv2

from producer.sources import FrameSource, SourceError, SourceFrame, encode_jpeg, jpeg_params
from shared.schema import format_time

logger = logging.getLogger(__name__)

# RTSP over TCP: no lost packets, and it passes the firewalls and NAT between a line and its gateway.
os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp")

OPEN_TIMEOUT_MS = 5000
# A stream silent this long counts as lost (a frame a second is already a very slow camera).
READ_TIMEOUT_MS = 5000
RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 10.0


@dataclass(frozen=True)
class Grab:
    image: cv2.typing.MatLike
    captured_at: datetime


class Gaps:
    """Lost-stream stretches: how many, and how long from the loss to the next frame."""

    def __init__(self, on_gap: Callable[[float], None] | None = None) -> None:
        self.count = 0
        self.seconds = 0.0
        self._since: float | None = None
        self._on_gap = on_gap

    def lost(self) -> None:
        if self._since is None:
            self._since = time.monotonic()

    def frame(self) -> None:
        if self._since is None:
            return
        seconds = time.monotonic() - self._since
        self._since = None
        self.count += 1
        self.seconds += seconds
        logger.info("Stream is back after a gap of %.1f s", seconds)
        if self._on_gap is not None:
            self._on_gap(seconds)


class StreamSource(FrameSource):
    """A stream URL through ``cv2.VideoCapture`` (FFmpeg); see the module docstring."""

    heavy = True
    #: The source keeps its own pace (``--fps``): the CLI must not slow its reading down.
    paces_itself = True

    def __init__(
        self,
        url: str,
        jpeg_quality: int = 90,
        fps: float | None = None,
        on_gap: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__()
        self.url = url
        self.gaps = Gaps(on_gap)
        self._params = jpeg_params(jpeg_quality)
        self._interval = 1.0 / fps if fps else 0.0
        self._next_at: float | None = None
        self._lock = threading.Condition()
        self._wanted = False
        self._handed: Grab | None = None
        self._stopping = threading.Event()
        self._last_ms: tuple[str, int] = ("", 0)
        capture = self._open()
        if capture is None:
            raise SourceError(f"{url}: OpenCV cannot open it as a stream")
        self._grabber = threading.Thread(target=self._grab_loop, args=(capture,), name="detfleet-grabber")
        self._grabber.daemon = True
        self._grabber.start()

    def one_pass(self) -> Iterator[SourceFrame]:
        """Frames until :meth:`close`; a lost stream pauses the pass instead of ending it."""
        while not self._stopping.is_set():
            tick = self._wait_for_tick()
            grab = self._take()
            if grab is None:
                return
            self._schedule_next(tick)
            stamp = format_time(grab.captured_at)
            body = encode_jpeg(grab.image, self._params, f"{self.url}: frame of {stamp}")
            yield SourceFrame(body, grab.captured_at, f"{self.url}@{stamp}", self._key(stamp))

    def close(self) -> None:
        self._stopping.set()
        with self._lock:
            self._lock.notify_all()

    def wait_closed(self) -> None:
        # A thread still inside FFmpeg when the interpreter exits aborts the process.
        self._grabber.join(OPEN_TIMEOUT_MS / 1000 + READ_TIMEOUT_MS / 1000)

    def stats(self) -> dict[str, float | int]:
        return {"stream_gaps": self.gaps.count, "gap_s": round(self.gaps.seconds, 3)}

    def _key(self, stamp: str) -> str:
        """The capture time, with a counter for frames that share its millisecond (kept apart)."""
        same = self._last_ms[1] + 1 if self._last_ms[0] == stamp else 0
        self._last_ms = (stamp, same)
        return f"stream:{stamp}" + (f"/{same}" if same else "")

    def _wait_for_tick(self) -> float:
        """Until the next tick (none without ``--fps``, the first at once); returns its time."""
        now = time.monotonic()
        if self._next_at is None or not self._interval:
            return now
        self._stopping.wait(max(0.0, self._next_at - now))
        return self._next_at

    def _schedule_next(self, tick: float) -> None:
        """One interval after this tick; but when the frame came late (the stream was away), one interval
        after it came: ticks caught up on would publish frames only a frame interval apart."""
        now = time.monotonic()
        late = now - tick > self._interval / 4
        self._next_at = (now if late else tick) + self._interval

    def _take(self) -> Grab | None:
        """The first frame grabbed after asking, or None once closed."""
        with self._lock:
            self._wanted, self._handed = True, None
            while self._handed is None and not self._stopping.is_set():
                self._lock.wait()
            grab, self._handed, self._wanted = self._handed, None, False
            return grab

    # -- the grabber thread ----------------------------------------------------------------------------

    def _grab_loop(self, capture: cv2.VideoCapture) -> None:
        current: cv2.VideoCapture | None = capture
        try:
            while not self._stopping.is_set():
                if current is None:
                    current = self._reopen()
                    continue
                if not self._grab_one(current):
                    current.release()
                    current = None
                    self.gaps.lost()
                    logger.warning("Stream %s lost: reconnecting", self.url)
        finally:
            if current is not None:
                current.release()

    def _grab_one(self, capture: cv2.VideoCapture) -> bool:
        if not capture.grab():
            return False
        captured = datetime.now(UTC)
        self.gaps.frame()
        with self._lock:
            wanted = self._wanted and self._handed is None
        if not wanted:
            return True
        ok, image = capture.retrieve()
        if not ok:
            return False
        with self._lock:
            self._handed = Grab(image, captured)
            self._lock.notify_all()
        return True

    def _reopen(self) -> cv2.VideoCapture | None:
        delay = RECONNECT_FIRST_S
        while not self._stopping.is_set():
            capture = self._open()
            if capture is not None:
                logger.info("Stream %s reopened", self.url)
                return capture
            logger.info("Stream %s still unreachable; next try in %.1f s", self.url, delay)
            self._stopping.wait(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)
        return None

    def _open(self) -> cv2.VideoCapture | None:
        capture = cv2.VideoCapture(
            self.url,
            cv2.CAP_FFMPEG,
            [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                OPEN_TIMEOUT_MS,
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                READ_TIMEOUT_MS,
            ],
        )
        if capture.isOpened():
            return capture
        capture.release()
        return None
