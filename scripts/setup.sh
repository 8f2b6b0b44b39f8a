#!/usr/bin/env bash
# One-shot, idempotent set-up: system packages for headless GUI tests, a project virtualenv in
# .venv, torch pinned through constraints.txt (CPU build), the package with its gui/test/bench/formats extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v Xvfb >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Xvfb and the Qt xcb libraries (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-cursor0 \
      libxkbcommon-x11-0 libxcb-image0 libxcb-render-util0 libxcb-shape0 libgl1 libegl1 \
      libfontconfig1 libdbus-1-3 >/dev/null
  else
    echo "setup: Xvfb not found and not root: GUI tests will be skipped" >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
links=()
[ -d /opt/wheels ] && links=(--find-links /opt/wheels)
stamp=.venv/.napari-e2enet-setup
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, from the constraint, so nothing later can pull a CUDA build.
  .venv/bin/python -m pip install -q "${links[@]}" -c constraints.txt torch
  .venv/bin/python -m pip install -q "${links[@]}" -c constraints.txt -e ".[gui,test,bench,formats]"
  echo "$want" > "$stamp"
fi
echo "setup: ready (.venv)" >&2
