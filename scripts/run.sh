#!/usr/bin/env bash
# The project's run command (README). Until the Gradio app and the bundled teaching model land, it runs
# the CLI end to end on a tiny Qwen2.5-VL built from a config (random weights: the answer is noise,
# the compression, bytes and timings are real). Extra arguments go to `python -m mmkv run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
demo=.cache/demo
mkdir -p "$demo"
.venv/bin/python - "$demo" <<'PY'
import sys
from pathlib import Path
from mmkv.testing.tiny import make_image, make_video, save_tiny
out = Path(sys.argv[1])
if not (out / "model").exists():
    save_tiny("qwen2_5_vl", out / "model")
for i in range(2):
    make_image(i, 112).save(out / f"image{i}.png")
make_video(out / "clip.mp4", num_frames=8)
PY
exec .venv/bin/python -m mmkv run --model "$demo/model" --image "$demo/image0.png" --image "$demo/image1.png" \
  --video "$demo/clip.mp4" --prompt "Which image has the red circle?" --method snapkv --budget 0.2 \
  --max-new-tokens 16 --trace "$demo/trace.json" "$@"
