#!/usr/bin/env bash
# Library-range check: the core and app tests against the newest releases users get from a plain
# `pip install` (transformers, Gradio, plotly, ... upgraded; torch stays the pinned CPU build), and
# against the oldest transformers pyproject.toml claims. Each runs in its own venv, so the pinned
# .venv stays the tested default. CI runs both (.ci/run).
# Usage: bash scripts/test_releases.sh [newest|oldest] [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-newest}"
shift || true
PYTHON="${PYTHON:-python3}"
venv=".venv-$which"
torch_pin="$(grep -E '^torch==' requirements.txt)"
oldest_transformers="$(sed -nE 's/.*"transformers>=([0-9.]+).*/\1/p' pyproject.toml)"
# Everything the tests need comes from requirements-dev.txt (torch pinned); then the libraries in question move.
# "newest" = the newest releases pyproject.toml allows (what `pip install mmkv` gives a user today).
allowed() { "$PYTHON" -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
deps = p['dependencies'] + p['optional-dependencies']['app']; \
print(next(d for d in deps if d.split('>')[0].split('=')[0].split('<')[0].strip() == sys.argv[1]))" "$1"; }
case "$which" in
  newest) libs=(--upgrade "$(allowed transformers)" "$(allowed gradio)" plotly tokenizers safetensors accelerate
                huggingface-hub pillow opencv-python-headless numpy) ;;
  oldest) libs=("transformers==${oldest_transformers}") ;;
  *) echo "usage: $0 [newest|oldest] [pytest args...]" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
log="$venv/install.log"
{
  "$venv/bin/python" -m pip install --upgrade pip &&
  "$venv/bin/python" -m pip install "$torch_pin" &&
  "$venv/bin/python" -m pip install -r requirements-dev.txt &&
  "$venv/bin/python" -m pip install "$torch_pin" "${libs[@]}" &&
  "$venv/bin/python" -m pip install --no-deps -e .
} > "$log" 2>&1 || { tail -n 40 "$log"; echo "test_releases.sh: install failed (log: $log)" >&2; exit 1; }
"$venv/bin/python" - <<'PY'
import gradio, torch, transformers
print(f"test_releases.sh: torch {torch.__version__}, transformers {transformers.__version__}, gradio {gradio.__version__}")
PY
# Deprecations of what mmkv calls are errors here, so the next rename fails this check, not a user.
exec "$venv/bin/python" -m pytest -p no:cacheprovider \
  -W "error:.*is deprecated and will be removed:FutureWarning" "$@"
