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
