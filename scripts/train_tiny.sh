#!/usr/bin/env bash
# The training chain of the bundled teaching model (mmkv/assets/mmkv-tiny-qwen2vl), stage by stage.
#
#   bash scripts/train_tiny.sh [OUT]        # OUT defaults to .cache/tiny-replay/model
#
# Every stage is `python -m training.tiny.train` with the arguments its run logged (each work dir's
# log.jsonl has them in its "start" records). A stage warm-starts from the previous stage's weights
# (--init) with a fresh optimizer and its own schedules; --stop-at ends a stage where the original run
# was stopped while keeping the LR schedule it ran under. Stages are resumable: re-running the script
# continues an interrupted stage and skips finished ones.
#
# Stage 1 was itself a resumed run whose arguments changed between restarts (the segments below);
# it ran on an earlier revision of the trainer that had only the per-cell vision probe, hence
# --bind-weight 0 --motion-weight 0 there. The chain took about 3 h of a 2-core CPU in total; this
# script has not been re-run end to end, so expect a model of the same kind, not the same bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-.cache/tiny-replay/model}
W=.cache/tiny-replay
train() { nice -n 5 "$PY" -m training.tiny.train --threads 2 --eval-n 64 "$@"; }
done_at() { [ -f "$1/ckpt.pt" ] && "$PY" -c "import sys, torch; sys.exit(0 if torch.load('$1/ckpt.pt', weights_only=False)['step'] >= $2 else 1)"; }

# ---- stage 1: mixed tasks, K curriculum 2 -> 8, per-cell vision probe only (1,650 steps)
S1=(--work $W/s1 --out $W/s1-out --bind-weight 0 --motion-weight 0 --eval-every 250)
S1_MIX=needle=2,colour_at=1,text_needle=1,video_direction=1,video_colour=1
S1_NOCOL=needle=2,colour_at=0,text_needle=1,video_direction=1,video_colour=1
done_at $W/s1 100 || train "${S1[@]}" --steps 3600 --stop-at 100 --k-hold 300 --k-ramp 1200 --weights $S1_MIX --video-frac 0.25
done_at $W/s1 250 || train "${S1[@]}" --steps 1500 --stop-at 250 --k-hold 200 --k-ramp 500 --weights $S1_MIX --video-frac 0.25
done_at $W/s1 550 || train "${S1[@]}" --steps 1200 --stop-at 550 --k-hold 200 --k-ramp 600 --weights $S1_NOCOL --video-frac 0.3
done_at $W/s1 800 || train "${S1[@]}" --steps 1200 --stop-at 800 --k-hold 200 --k-ramp 600 --weights $S1_NOCOL --video-frac 0.3 --password-frac 0.8
done_at $W/s1 1200 || train "${S1[@]}" --steps 1800 --stop-at 1200 --k-hold 200 --k-ramp 600 --weights $S1_NOCOL --video-frac 0.3 --password-frac 0.8
done_at $W/s1 1400 || train "${S1[@]}" --steps 1400 --k-hold 300 --k-ramp 1200 --weights $S1_MIX --video-frac 0.25
done_at $W/s1 1650 || train "${S1[@]}" --steps 4400 --stop-at 1650 --k-hold 300 --k-ramp 1200 --weights $S1_MIX --video-frac 0.25

# ---- stage 2: K <= 3, needle / colour-by-index / video weighted up (350 steps)
done_at $W/s2 350 || train --init $W/s1 --work $W/s2 --out $W/s2-out --seed 1 --steps 1500 --stop-at 350 \
  --k-start 2 --k-hold 200 --k-ramp 400 --k-max 4 --decay 0.1 --eval-every 150 --bind-weight 0 --motion-weight 0 \
  --weights needle=3,colour_at=2,text_needle=0.5,video_direction=2,video_colour=1 --video-frac 0.35

# ---- stage 3: + image-index binding probe and video motion probe (950 steps)
done_at $W/s3 950 || train --init $W/s2 --work $W/s3 --out $W/s3-out --seed 3 --steps 1500 --stop-at 950 \
  --k-start 2 --k-hold 300 --k-ramp 400 --k-max 4 --decay 0.1 --eval-every 150 \
  --weights needle=3,colour_at=2,text_needle=0.5,video_direction=2,video_colour=1 --video-frac 0.35

# ---- stage 4: + retrieval-attention loss, mixed tasks (350 steps; video tasks learn here)
done_at $W/s4 350 || train --init $W/s3 --work $W/s4 --out $W/s4-out --seed 4 --steps 2000 --stop-at 350 \
  --k-start 2 --k-hold 150 --k-ramp 600 --k-max 8 --decay 0.15 --eval-every 150 --retrieval-weight 1 \
  --weights needle=3,colour_at=2,text_needle=0.5,video_direction=1.5,video_colour=1.5 --video-frac 0.35

# ---- stage 5: image needle alone at K = 2, retrieval loss x3 (300 steps; "which image" learns here)
done_at $W/n1 300 || train --init $W/s4 --work $W/n1 --out $W/n1-out --seed 11 --steps 300 \
  --k-start 2 --k-hold 1000 --k-max 2 --warmup 20 --eval-every 1000 --retrieval-weight 3 \
  --weights needle=1,colour_at=0,text_needle=0 --video-frac 0 --password-frac 0

# ---- stage 6: image needle alone, K 2 -> 4 (500 steps)
done_at $W/n2 500 || train --init $W/n1 --work $W/n2 --out $W/n2-out --seed 12 --steps 500 \
  --k-start 2 --k-hold 0 --k-ramp 300 --k-max 4 --warmup 20 --decay 0.1 --eval-every 100 --retrieval-weight 3 \
  --weights needle=1,colour_at=0,text_needle=0 --video-frac 0 --password-frac 0

# ---- stage 7: image needle alone, K 4 -> 7, LR 2e-3 (700 steps)
done_at $W/n3 700 || train --init $W/n2 --work $W/n3 --out $W/n3-out --seed 13 --steps 1200 --stop-at 700 --lr 2e-3 \
  --k-start 4 --k-hold 250 --k-ramp 600 --k-max 8 --warmup 20 --decay 0.2 --eval-every 150 --retrieval-weight 3 \
  --weights needle=1,colour_at=0,text_needle=0 --video-frac 0 --password-frac 0

# ---- stage 8: all tasks but colour-by-index again, K 7 -> 8, needle weighted up (1,000 steps)
done_at $W/m1 1000 || train --init $W/n3 --work $W/m1 --out $W/m1-out --seed 21 --steps 1000 --lr 2e-3 \
  --k-start 7 --k-hold 100 --k-ramp 100 --k-max 8 --warmup 20 --decay 0.3 --eval-every 100 --retrieval-weight 3 \
  --weights needle=4,colour_at=0,text_needle=1,video_direction=1,video_colour=1 --video-frac 0.3 --password-frac 0.5

# ---- stage 9: video alone (500 steps; the video tasks learn here, the image tasks are forgotten)
done_at $W/v2 500 || train --init $W/m1 --work $W/v2 --out $W/v2-out --seed 41 --steps 600 --stop-at 500 --lr 2e-3 \
  --k-start 8 --k-max 8 --warmup 20 --decay 0.2 --eval-every 100 --retrieval-weight 3 \
  --weights video_direction=1,video_colour=1 --video-frac 1.0

# ---- stage 10: all tasks but colour-by-index, K = 8 (500 steps); the exported model: --out receives it
# when a task reaches 95% at its hardest setting
train --init $W/v2 --work $W/m2 --out "$OUT" --seed 51 --steps 500 --lr 1.5e-3 \
  --k-start 8 --k-max 8 --warmup 20 --decay 0.3 --eval-every 100 --retrieval-weight 3 \
  --weights needle=3,colour_at=0,text_needle=1,video_direction=1,video_colour=1 --video-frac 0.35 --password-frac 0.5
