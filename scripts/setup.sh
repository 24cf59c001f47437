#!/usr/bin/env bash
# Everything the demo and the tests need, from nothing; each step is skipped when done.
# System packages come from apt-get when missing (as root); Sockudo is built once into a
# per-user cache (~/.cache/ai-transport-worker) and reused by every later run and clone.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
command -v cc >/dev/null || need_apt+=(gcc)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
# The browser tests drive Debian's Chromium through Playwright (never a downloaded browser).
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || need_apt+=(chromium)
if ((${#need_apt[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "setup: apt-get install ${need_apt[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}"
  else
    echo "setup: please install these system packages: ${need_apt[*]}" >&2
    exit 1
  fi
fi

if ! command -v cargo >/dev/null && [[ ! -x "$HOME/.cargo/bin/cargo" ]]; then
  echo "setup: cargo not found; install the Rust toolchain (https://rustup.rs) to build Sockudo" >&2
  exit 1
fi

if ! command -v uv >/dev/null; then
  echo "setup: installing uv"
  python3 -m pip install -q uv
fi
UV="uv"; command -v uv >/dev/null || UV="python3 -m uv"
$UV sync --locked -q

$UV run python -m worker.devstack.sockudo_install >/dev/null

if [[ ! -d tests/js/node_modules && -f tests/js/package-lock.json ]]; then
  echo "setup: npm ci (ably-js for the conformance suite)"
  npm ci --prefix tests/js --no-audit --no-fund -q
fi
if [[ ! -f web/node_modules/ably/build/ably.min.js && -f web/package-lock.json ]]; then
  echo "setup: npm ci (ably-js's browser bundle for the demo page)"
  npm ci --prefix web --no-audit --no-fund -q
fi
echo "setup: ready"
