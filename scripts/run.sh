#!/usr/bin/env bash
# The project's run command (README): set up .venv, then start the Gradio app on the default model,
# serving http://localhost:7860 (the URL is printed when it is ready; Ctrl-C stops it).
# Default model: $MMKV_MODEL (hub id or local checkpoint), else the bundled teaching model in
# mmkv/assets/mmkv-tiny-qwen2vl, else a tiny random-weight Qwen2.5-VL built into .cache/demo-model (the
# page says so). GRADIO_SERVER_NAME / GRADIO_SERVER_PORT change the address. Extra arguments are ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export GRADIO_ANALYTICS_ENABLED="${GRADIO_ANALYTICS_ENABLED:-False}"
export GRADIO_SERVER_NAME="${GRADIO_SERVER_NAME:-127.0.0.1}"
export GRADIO_SERVER_PORT="${GRADIO_SERVER_PORT:-7860}"
echo "run.sh: starting the mmkv app on http://localhost:${GRADIO_SERVER_PORT} (first start builds the demo model if needed)"
exec .venv/bin/python app.py
