"""Live camera streams on loopback for the gateway tests: RTSP from GStreamer, MJPEG over HTTP from ffmpeg.

Each server listens on a free port picked at run time and can be stopped and started again on the same
port, as a camera that reboots. The MJPEG stream codes each frame's index in six vertical bars (bar k is
bright when bit k of the index is set), so a test can tell which frame of the stream a published frame was.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import cv2
import numpy as np
import psutil

from tests.chaos.nodes import LOOPBACK, free_port

Kind = Literal["rtsp", "mjpeg"]
RTSP_SERVER = Path(__file__).with_name("rtsp_server.py")
SYSTEM_PYTHON = "/usr/bin/python3"  # has Debian's python3-gi; the venv does not
STREAM_FPS = 30
CODE_BITS = 6
START_LIMIT_S = 30  # bound against a server that never listens
# geq draws bar k (of CODE_BITS across the width) bright when bit k of the frame number N is set.
_CODED = (
    f"nullsrc=s=192x48:r={STREAM_FPS},format=gray,"
    f"geq=lum='if(gt(bitand(N\\,pow(2\\,floor(X*{CODE_BITS}/W)))\\,0)\\,235\\,16)'"
)


class LiveServer:
    """One live stream server; ``url`` is what a gateway reads."""

    def __init__(self, kind: Kind, log: Path) -> None:
        self.kind = kind
        self.port = free_port()
        self.log = log
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.kind == "rtsp":
            return f"rtsp://{LOOPBACK}:{self.port}/cam"
        return f"http://{LOOPBACK}:{self.port}/cam.mjpg"

    def _command(self) -> list[str]:
        if self.kind == "rtsp":
            return [SYSTEM_PYTHON, str(RTSP_SERVER), str(self.port)]
        ffmpeg = shutil.which("ffmpeg") or "ffmpeg"
        # -re: frames on the clock, as a camera makes them; -flush_packets: each frame sent as made (not in
        # 32 KiB bursts of a dozen small frames); -listen 1: serve one client over HTTP.
        return [ffmpeg, "-hide_banner", "-loglevel", "error", "-re", "-f", "lavfi", "-i", _CODED,
                "-pix_fmt", "yuvj420p", "-q:v", "4", "-flush_packets", "1",
                "-f", "mpjpeg", "-listen", "1", self.url]  # fmt: skip

    def start(self) -> None:
        with self.log.open("ab") as output:
            self._process = subprocess.Popen(self._command(), stdout=output, stderr=output)
        self._await_listening()

    def stop(self) -> None:
        """Gone at once, as a camera that loses power: every client's connection drops."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=START_LIMIT_S)
            self._process = None

    def _await_listening(self) -> None:
        """Until the port is in LISTEN state; connecting to find out would use up ffmpeg's one client."""
        deadline = time.monotonic() + START_LIMIT_S
        while not self._listening():
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited {self._process.returncode}: see {self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} server did not listen on {self.port} in {START_LIMIT_S} s")
            time.sleep(0.05)

    def _listening(self) -> bool:
        return any(
            c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.port
            for c in psutil.net_connections(kind="tcp4")
        )

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def frame_code(jpeg: bytes) -> int:
    """The index, modulo 2**CODE_BITS, that the MJPEG server coded into this frame."""
    gray = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert gray is not None, "a published frame that does not decode"
    width = gray.shape[1] // CODE_BITS
    bars = [gray[:, k * width + 4 : (k + 1) * width - 4].mean() > 128 for k in range(CODE_BITS)]
    return sum(int(bright) << k for k, bright in enumerate(bars))
