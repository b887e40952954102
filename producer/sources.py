"""Frame sources for ``detfleet produce``: a folder of images, one image, a video file or a stream URL.

Images are sent exactly as stored (the contract wants the encoded image as captured); video and stream
frames are decoded by OpenCV and JPEG-encoded at the configured quality. A folder file that is not a JPEG
or PNG is skipped with a warning and counted; a source that cannot be read raises :class:`SourceError`.

Every frame carries a ``key`` that names it within its camera, from what identifies it rather than from
the time it was read: a folder file by its path under the folder and its content, a video frame by the
file's identity and the frame's index, a stream frame by its capture time. ``--deterministic-ids`` derives
the task id from it, so the same frame produced again is the same task.
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import cv2

from shared.errors import DetfleetError
from shared.frames import JPEG_MAGIC, PNG_MAGIC

logger = logging.getLogger(__name__)

STREAM_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp"})


class SourceError(DetfleetError):
    """The frame source cannot be read: a missing path, an unknown URL scheme, a file OpenCV cannot open."""


# A video file's identity: its size and a hash of its first bytes (hashing a long video whole would make
# start-up wait on the disk).
VIDEO_IDENTITY_BYTES = 1 << 20


@dataclass(frozen=True)
class SourceFrame:
    body: bytes
    captured_at: datetime
    origin: str
    #: Names this frame within its camera: the same frame read again has the same key.
    key: str


def content_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def file_key(relative: Path, body: bytes) -> str:
    """A folder file's key: its path under the source folder and its content's hash."""
    return f"file:{relative.as_posix()}:{content_hash(body)}"


def video_identity(path: Path) -> str:
    with path.open("rb") as file:
        head = file.read(VIDEO_IDENTITY_BYTES)
    return f"{path.stat().st_size}:{content_hash(head)}"


def is_accepted_image(head: bytes) -> bool:
    return head.startswith(JPEG_MAGIC) or head.startswith(PNG_MAGIC)


class FrameSource(ABC):
    """One pass over a source's frames; :func:`frames` repeats passes for ``--loop``."""

    #: True when producing a frame costs real CPU (decode and encode): run it off the event loop.
    heavy = False
    #: True for a live source that keeps its own pace: ``--fps`` must not slow its reading down.
    paces_itself = False

    def __init__(self) -> None:
        self._skipped: set[str] = set()

    @property
    def skipped(self) -> int:
        """Files skipped as not images, each counted once however often the source loops."""
        return len(self._skipped)

    @abstractmethod
    def one_pass(self) -> Iterator[SourceFrame]: ...

    def close(self) -> None:
        """Stop a pass that may be waiting (a live stream); called from another thread on a signal."""
        return None

    def wait_closed(self) -> None:
        """Block until what :meth:`close` stopped has ended (a stream's grabber thread)."""
        return None

    def stats(self) -> dict[str, float | int]:
        """Figures of this source for the run's summary (a stream's gaps); none for most."""
        return {}

    def _skip(self, origin: str, why: str) -> None:
        if origin not in self._skipped:
            logger.warning("Skipping %s: %s", origin, why)
            self._skipped.add(origin)


class FolderSource(FrameSource):
    """Every file under ``root``, recursively, in sorted path order."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def one_pass(self) -> Iterator[SourceFrame]:
        for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
            frame = self._read(path)
            if frame is not None:
                yield frame

    def _read(self, path: Path) -> SourceFrame | None:
        try:
            body = path.read_bytes()
        except OSError as error:
            self._skip(str(path), f"unreadable ({error.strerror or error})")
            return None
        if not is_accepted_image(body[:8]):
            self._skip(str(path), "not a JPEG or PNG image")
            return None
        return SourceFrame(body, datetime.now(UTC), str(path), file_key(path.relative_to(self.root), body))


class ImageFileSource(FrameSource):
    """One JPEG or PNG file, sent as it is (``--loop``/``--limit`` repeat it)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._body = path.read_bytes()
        self._key = f"image:{content_hash(self._body)}"

    def one_pass(self) -> Iterator[SourceFrame]:
        yield SourceFrame(self._body, datetime.now(UTC), str(self.path), self._key)


class VideoSource(FrameSource):
    """A video file through ``cv2.VideoCapture``; frames are JPEG-encoded."""

    heavy = True

    def __init__(self, target: str, jpeg_quality: int = 90) -> None:
        super().__init__()
        self.target = target
        self._params = jpeg_params(jpeg_quality)
        self._first: cv2.VideoCapture | None = self._open()
        self._identity = video_identity(Path(target))

    def one_pass(self) -> Iterator[SourceFrame]:
        # The capture opened by the constructor serves the first pass; --loop reopens for each later one.
        capture, self._first = self._first or self._open(), None
        try:
            index = 0
            while True:
                ok, image = capture.read()
                if not ok:
                    return
                body = encode_jpeg(image, self._params, f"{self.target}: frame {index}")
                key = f"video:{self._identity}#{index}"
                yield SourceFrame(body, datetime.now(UTC), f"{self.target}#{index}", key)
                index += 1
        finally:
            capture.release()

    def _open(self) -> cv2.VideoCapture:
        capture = cv2.VideoCapture(self.target)
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"{self.target}: OpenCV cannot open it as a video or stream")
        return capture


def jpeg_params(quality: int) -> list[int]:
    return [int(cv2.IMWRITE_JPEG_QUALITY), quality]


def encode_jpeg(image: cv2.typing.MatLike, params: list[int], what: str) -> bytes:
    ok, encoded = cv2.imencode(".jpg", image, params)
    if not ok:
        raise SourceError(f"{what} could not be JPEG-encoded")
    return bytes(encoded.tobytes())


def open_source(
    spec: str,
    jpeg_quality: int = 90,
    fps: float | None = None,
    on_gap: Callable[[float], None] | None = None,
) -> FrameSource:
    """The source ``spec`` names: a live stream URL (at ``fps``, ``on_gap`` told of each lost stretch),
    a folder, an image file or a video file."""
    if "://" in spec:
        scheme = urlsplit(spec).scheme.lower()
        if scheme not in STREAM_SCHEMES:
            raise SourceError(
                f"{spec}: unsupported URL scheme {scheme!r} (use one of {sorted(STREAM_SCHEMES)})"
            )
        from producer.stream import StreamSource

        return StreamSource(spec, jpeg_quality, fps, on_gap)
    path = Path(spec)
    if path.is_dir():
        return FolderSource(path)
    if not path.is_file():
        raise SourceError(f"{spec}: no such file or folder")
    try:
        with path.open("rb") as file:
            head = file.read(8)
        return ImageFileSource(path) if is_accepted_image(head) else VideoSource(spec, jpeg_quality)
    except OSError as error:
        raise SourceError(f"{spec}: cannot read it ({error.strerror or error})") from None


def frames(source: FrameSource, loop: bool = False) -> Iterator[SourceFrame]:
    """The source's frames, over and over with ``loop`` (a pass that yields nothing ends it)."""
    while True:
        produced = False
        for frame in source.one_pass():
            produced = True
            yield frame
        if not (loop and produced):
            return
