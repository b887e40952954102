#!/usr/bin/env bash
# Test tools from Debian's packages: promtool (package prometheus) checks deploy/prometheus/rules.yml.
set -euo pipefail
if ! command -v promtool >/dev/null; then
if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
  echo "tools: promtool is missing; install Debian's prometheus package (apt-get install prometheus)" >&2
  exit 1
fi
install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
install || { apt-get update -q >/dev/null && install; } || { echo "tools: could not install prometheus (promtool)" >&2; exit 1; }
fi

# kubectl (package kubernetes-client) renders deploy/k8s/ overlays with its built-in kustomize.
if ! command -v kubectl >/dev/null; then
  if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
    echo "tools: kubectl is missing; install Debian's kubernetes-client package" >&2
    exit 1
  fi
  install_kubectl() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends kubernetes-client >/dev/null; }
  install_kubectl || { apt-get update -q >/dev/null && install_kubectl; } || { echo "tools: could not install kubernetes-client (kubectl)" >&2; exit 1; }
fi

# openssl makes the test CA and certificates of tests/integration/test_tls.py.
if ! command -v openssl >/dev/null; then
  if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
    echo "tools: openssl is missing; install Debian's openssl package" >&2
    exit 1
  fi
  install_openssl() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssl >/dev/null; }
  install_openssl || { apt-get update -q >/dev/null && install_openssl; } || { echo "tools: could not install openssl" >&2; exit 1; }
fi

# The gateway stream tests serve live cameras on loopback: MJPEG over HTTP from ffmpeg, RTSP from
# GStreamer's RTSP server run by the system python3 (python3-gi, gir1.2-gst-rtsp-server-1.0; the JPEG
# encoder and RTP payloader come with the base and good plugin sets).
stream_tools_present() {
  command -v ffmpeg >/dev/null && [ -x /usr/bin/python3 ] && /usr/bin/python3 -c \
    'import gi; gi.require_version("GstRtspServer", "1.0"); from gi.repository import Gst, GstRtspServer; Gst.init(None); assert Gst.ElementFactory.find("jpegenc") and Gst.ElementFactory.find("rtpjpegpay")' \
    >/dev/null 2>&1
}
if ! stream_tools_present; then
  if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
    echo "tools: ffmpeg or GStreamer's RTSP server is missing; apt-get install ffmpeg python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good" >&2
    exit 1
  fi
  streams=(ffmpeg python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good)
  install_streams() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${streams[@]}" >/dev/null; }
  install_streams || { apt-get update -q >/dev/null && install_streams; } || { echo "tools: could not install ${streams[*]}" >&2; exit 1; }
fi

# The HTTP gateway's live page is tested in headless Chromium (Debian's chromium), driven by Playwright with
# the system browser (tests/integration/test_http_gateway_page.py); Playwright never downloads one.
if ! command -v chromium >/dev/null; then
  if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
    echo "tools: chromium is missing; install Debian's chromium package" >&2
    exit 1
  fi
  install_chromium() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null; }
  install_chromium || { apt-get update -q >/dev/null && install_chromium; } || { echo "tools: could not install chromium" >&2; exit 1; }
fi
