"""A live RTSP camera on loopback for the stream tests: GStreamer's RTSP server with a test pattern.

Run by the system Python, which has Debian's python3-gi and gir1.2-gst-rtsp-server-1.0 (scripts/tools.sh
installs them): ``python3 tests/support/rtsp_server.py PORT``. It serves ``rtsp://127.0.0.1:PORT/cam``
(MJPEG over RTP at 30 frames a second, live: frames are made on the clock whether anyone reads or not),
prints ``ready`` once it listens and runs until killed.
"""

from __future__ import annotations

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

PIPELINE = (
    "( videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=30/1"
    " ! videoconvert ! video/x-raw,format=I420 ! jpegenc ! rtpjpegpay name=pay0 pt=26 )"
)


def main(port: int) -> None:
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(PIPELINE)
    factory.set_shared(True)  # one pipeline for every client, as a camera has one sensor
    server.get_mount_points().add_factory("/cam", factory)
    if server.attach(None) == 0:
        sys.exit(f"rtsp_server: cannot listen on 127.0.0.1:{port}")
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
