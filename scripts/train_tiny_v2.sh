#!/usr/bin/env bash
# The training chain of teaching model v2 (docs/tiny-v2.md), stage by stage, resumable across machines.
#
#   bash scripts/train_tiny_v2.sh              # run (or continue) the chain
#   COMMIT=1 bash scripts/train_tiny_v2.sh     # ... and git-commit each stage's output when it finishes
#   ONLY=s1 bash scripts/train_tiny_v2.sh      # run one stage (its input stage must be finished)
#
# Every stage is `python -m training.tiny.train --arch v2` with the arguments below (each stage's log.jsonl
# "start" records and args.json repeat them). A stage warm-starts from the previous stage's committed output
# (--init training/tiny-v2/<previous>: model.safetensors + aux.safetensors) with a fresh optimizer and its own
# schedules. Finished stages live in training/tiny-v2/<stage>/ (model.safetensors, aux.safetensors,
# metrics.json, log.jsonl, args.json; no optimizer state) and are skipped; an interrupted stage continues from
# its checkpoint in .cache/tiny-v2/<stage>/ckpt.pt on the same machine, and restarts from its input stage on a
# fresh one. Stage g0 is the function-preserving growth of the shipped v1 model (training.tiny.grow), no training.
#
# The whole script is one function, parsed before it runs, so editing this file (e.g. appending stages)
# never disturbs a chain already running; a restarted chain picks the edits up.
main() {
set -euo pipefail
cd "$(dirname "$0")/.."
SCRIPT=scripts/train_tiny_v2.sh
PY=${PY:-.venv/bin/python}
W=${W:-.cache/tiny-v2}          # work dirs: checkpoints with optimizer state (not committed)
T=${T:-training/tiny-v2}        # finished stages (committed)
THREADS=${THREADS:-2}
mkdir -p "$W" "$T"

train() { "$PY" -m training.tiny.train --arch v2 --threads "$THREADS" --eval-n 64 "$@"; }
finished() { [ -f "$T/$1/metrics.json" ]; }

commit_stage() {  # COMMIT=1: commit only this stage's files, retrying while another commit holds the index
  [ "${COMMIT:-0}" = 1 ] || return 0
  local msg
  msg="tiny v2: stage $1 finished ($("$PY" -c "import json,sys; m=json.load(open('$T/$1/metrics.json')); print(m['steps'], 'steps,', ', '.join(f'{k} {v:.2f}' for k, v in m['heldout_accuracy'].items()))"))"
  for _ in $(seq 1 30); do
    if git add -- "$T/$1" && git commit -q -m "$msg" -- "$T/$1"; then echo "committed $T/$1"; return 0; fi
    sleep 10
  done
  echo "could not commit $T/$1 (left in the work tree)" >&2
}

# stage NAME INPUT ARGS...: run stage NAME from finished stage INPUT unless NAME is finished
stage() {
  local name=$1 input=$2; shift 2
  if finished "$name"; then echo "stage $name: finished (skipped)"; return 0; fi
  if [ -n "${ONLY:-}" ] && [ "$ONLY" != "$name" ]; then echo "stage $name: not run (ONLY=$ONLY)"; return 0; fi
  finished "$input" || { echo "stage $name needs stage $input, which is not finished" >&2; exit 1; }
  echo "stage $name: from $input, $(date -u +%FT%TZ)"
  train --init "$T/$input" --work "$W/$name" --stage-out "$T/$name" "$@"
  commit_stage "$name"
  # re-read this file after every finished stage: stages appended meanwhile run next, finished ones are skipped
  [ -n "${ONLY:-}" ] || exec bash "$SCRIPT"
}

ALL=needle=2,text_needle=1,spot_difference=1,count=1,video_direction=1,video_colour=1

# ---- g0: v1 grown to the v2 shape (function-preserving; see training/tiny/grow.py), evaluated at v2's sizes
if ! finished g0 && { [ -z "${ONLY:-}" ] || [ "$ONLY" = g0 ]; }; then
  "$PY" -m training.tiny.grow "$W/g0-model"
  train --init "$W/g0-model" --work "$W/g0" --stage-out "$T/g0" --steps 0
  commit_stage g0
fi

# Stages are short (200 steps, 30-60 min on the shared 2-core CPU) so that each sitting commits some; each ends
# with a short LR decay. Common settings: batch 16, retrieval-attention loss x3 on layer 3 (v1's layer 2), heads 0-1.
COMMON=(--batch 16 --warmup 20 --decay 0.25 --eval-every 100 --retrieval-weight 3)
SPOT=(--k-start 2 --k-hold 0 --k-ramp 100 --k-max 4 --spot-frac 0.6 --video-frac 0.15 --count-frac 0 --password-frac 0.5
      --weights needle=2,text_needle=1,spot_difference=1,count=0,video_direction=1,video_colour=1)
COUNT=(--k-hold 50 --k-ramp 150 --k-max 8 --spot-frac 0.15 --video-frac 0.15 --count-frac 0.8 --password-frac 0.3
       --weights needle=1,text_needle=0.5,spot_difference=1,count=4,video_direction=1,video_colour=1)
MIX=(--k-start 8 --k-max 8 --spot-frac 0.2 --video-frac 0.25 --count-frac 0.5 --password-frac 0.5 --weights $ALL)

# ---- s1: spot_difference focus (60% two-picture episodes), the other tasks replayed at K <= 4
stage s1 g0 --seed 101 --steps 200 --lr 2e-3 "${COMMON[@]}" "${SPOT[@]}"

# ---- s2: spot_difference focus with the changed-cell probe (layer 3: does this cell differ in the other
# picture?), LR halved and more replay (s1 at step 100: the v1 tasks fell, video_colour 1.00 -> 0.19)
stage s2 s1 --seed 102 --steps 200 --lr 1e-3 "${COMMON[@]}" "${SPOT[@]}" --spot-frac 0.45 --video-frac 0.2 --diff-weight 1

# From s3 on: the changed-cell probe weighs changed cells x10 (about 3 cells in 49 change; unweighted, s2's probe
# found 0-13% of the changed cells in its first 30 steps), and the retrieval-attention loss also pulls spot_difference's colour word to the changed
# cells of both pictures (s1: 0.05 after 200 steps at 60% of the episodes).
# Also from s3 on (a change of mmkv.tiny.tasks, not of the arguments): v2 pictures are drawn on a position-shaded
# background, since M-RoPE at head_dim 32 shows the text model the width axis only at its lowest frequencies
# and s2's teacher-forced answers never named "moved" (docs/tiny-v2.md). Stages g0-s2 were trained and
# evaluated on flat backgrounds.
V2AUX=(--diff-pos-weight 10 --spot-retrieval)

# ---- s3: spot_difference focus with the spot retrieval target
stage s3 s2 --seed 103 --steps 200 --lr 1e-3 "${COMMON[@]}" "${SPOT[@]}" --spot-frac 0.45 --video-frac 0.2 --diff-weight 1 "${V2AUX[@]}"

# ---- Second sitting (steps cost 1.5-5 s here when the machine is otherwise idle). s1-s3 focused on
# spot_difference (0.05-0.08 after 600 steps) while needle@8 fell to 0.08-0.28, so the plan turns to v1's
# recipe for the image needle first: the needle alone with the retrieval loss, K ramped (v1: n1-n3), then
# mixes that replay it. The two new tasks then get focus stages of their own on top of a working needle.
NEEDLE=(--weights needle=1,text_needle=0,spot_difference=0,count=0,video_direction=0,video_colour=0
        --video-frac 0 --spot-frac 0 --count-frac 0 --password-frac 0)
# ---- n1: image needle alone, K 2 -> 4, retrieval loss x3, LR 2e-3
stage n1 s3 --seed 111 --steps 300 --lr 2e-3 --batch 16 --warmup 20 --decay 0.2 --eval-every 150 --retrieval-weight 3 \
  --k-start 2 --k-hold 0 --k-ramp 200 --k-max 4 "${NEEDLE[@]}"
# ---- n2: image needle alone, K 4 -> 8
stage n2 n1 --seed 112 --steps 400 --lr 2e-3 --batch 16 --warmup 20 --decay 0.25 --eval-every 200 --retrieval-weight 3 \
  --k-start 4 --k-hold 50 --k-ramp 250 --k-max 8 "${NEEDLE[@]}"
# ---- m1: v1's tasks at K = 8 (needle weighted up), the new tasks replayed lightly
stage m1 n2 --seed 121 --steps 400 --lr 1.5e-3 "${COMMON[@]}" --eval-every 200 --k-start 8 --k-max 8 \
  --spot-frac 0.1 --video-frac 0.3 --count-frac 0.2 --password-frac 0.5 \
  --weights needle=4,text_needle=1,spot_difference=1,count=1,video_direction=1,video_colour=1 \
  --diff-weight 0.5 --presence-weight 0.5 "${V2AUX[@]}"
# ---- Third sitting. After two sittings spot_difference (0.00-0.08) and count (0.00-0.05) had not left chance,
# so by the issue's rule v2 ships without them: from here they get no episodes and no loss, and the capacity
# goes to the shipped tasks. (c1, a count focus stage from m1 with the colour-presence probe, ran 200 of 400
# steps in the second sitting and was dropped; it is not part of the chain.)
SHIPPED=(--spot-frac 0 --count-frac 0 --diff-weight 0 --presence-weight 0)
# ---- v1: video focus (60% video episodes; video_colour fell from g0's 1.00 to 0.69 in the mixes), image needle
# and text needle replayed at K = 8
stage v1 m1 --seed 141 --steps 300 --lr 1e-3 "${COMMON[@]}" --eval-every 150 --k-start 8 --k-max 8 \
  --video-frac 0.6 --password-frac 0.5 "${SHIPPED[@]}" \
  --weights needle=2,text_needle=1,spot_difference=0,count=0,video_direction=3,video_colour=2
# v1 met the bar (held-out 100 per task with mmkv.generate, Full: needle@8 0.98, text_needle@8 1.00,
# video_direction 1.00, video_colour 0.98) and is the shipped model (scripts/ship_tiny.py training/tiny-v2/v1).
# An anneal stage queued after it (m2, LR 6e-4) was stopped at step 30 and removed from the chain.
echo "chain finished: every stage in this file is in $T"
}
main "$@"
