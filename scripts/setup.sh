#!/usr/bin/env bash
# Create .venv and install everything the project needs (idempotent; CPU build of torch, pinned).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.mmkv-installed
want="$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log=.venv/install.log
  {
    .venv/bin/python -m pip install --upgrade pip &&
    .venv/bin/python -m pip install -r requirements-dev.txt &&
    .venv/bin/python -m pip install --no-deps -e .
  } > "$log" 2>&1 || { cat "$log"; echo "setup failed (log: $log)" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
