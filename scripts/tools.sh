#!/usr/bin/env bash
# Test tools from Debian's packages: promtool (package prometheus) checks deploy/prometheus/rules.yml.
set -euo pipefail
command -v promtool >/dev/null && exit 0
if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
  echo "tools: promtool is missing; install Debian's prometheus package (apt-get install prometheus)" >&2
  exit 1
fi
install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
install || { apt-get update -q >/dev/null && install; } || { echo "tools: could not install prometheus (promtool)" >&2; exit 1; }
