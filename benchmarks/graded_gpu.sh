#!/usr/bin/env bash
# configs/graded-gpu.yaml on one H100/H200 in one command (issue 14 item 6): the curriculum, its
# from-scratch baseline at 3x the curriculum's compute, BLiMP / Zorro (first 200 pairs of every
# paradigm file) and WikiText-2 of both final models, and the report. Results in $OUT: report.md,
# its two loss figures, both summaries and both eval.json (7 files; the device returns 8 at most).
#
#   bash benchmarks/graded_gpu.sh --prepare   # here, once: the corpus and the eval subset into .corpus/
#   bash benchmarks/graded_gpu.sh             # on the GPU machine, with .whl and .corpus carried
#
# LLMAGOGY_CORPUS (default ../shared/corpus) is the corpus --prepare copies; RUNS (default
# /tmp/graded-gpu) holds the runs. A run resumes when the command is repeated.
set -euo pipefail
cd "$(dirname "$0")/.."
C=.corpus
if [ "${1:-}" = "--prepare" ]; then
  SRC=${LLMAGOGY_CORPUS:-../shared/corpus}
  rm -rf "$C"
  mkdir -p "$C/eval/blimp" "$C/eval/zorro"
  cp -r "$SRC"/stage*_* "$C/"
  cp "$SRC/eval/wikitext2_valid.txt" "$C/eval/"
  for f in "$SRC"/eval/blimp/*.jsonl; do head -n 200 "$f" > "$C/eval/blimp/$(basename "$f")"; done
  for f in "$SRC"/eval/zorro/*.jsonl; do head -n 200 "$f" > "$C/eval/zorro/$(basename "$f")"; done
  # not in git, carried by the device tool as an ignored path (carry: [".whl", ".corpus"])
  grep -qx '/.corpus/' .git/info/exclude 2>/dev/null || echo '/.corpus/' >> .git/info/exclude
  du -sh "$C"
  exit 0
fi
[ -d "$C/stage4_general" ] || { echo "no $C/: run 'bash benchmarks/graded_gpu.sh --prepare' first" >&2; exit 2; }
CPU=
source benchmarks/gpu_env.sh
export LLMAGOGY_CORPUS=$PWD/$C
RUNS=${RUNS:-/tmp/graded-gpu}
DEST=${OUT:-$RUNS/out}
mkdir -p "$DEST"
L=("$PYTHON" -m llmagogy_ds.cli)
"${L[@]}" run configs/graded-gpu.yaml --run-dir "$RUNS/curriculum" --set wandb.mode=disabled
"${L[@]}" baseline configs/graded-gpu.yaml --curriculum "$RUNS/curriculum" --run-dir "$RUNS/baseline" \
  --set wandb.mode=disabled
for R in curriculum baseline; do
  "${L[@]}" eval "$RUNS/$R" --pairs "$C/eval/blimp" --pairs "$C/eval/zorro" --text "$C/eval/wikitext2_valid.txt"
  cp "$RUNS/$R/summary.json" "$DEST/summary_$R.json"
  find "$RUNS/$R/stages" -name eval.json | sort | tail -1 | xargs -I{} cp {} "$DEST/eval_$R.json"
done
"${L[@]}" report "$RUNS/curriculum" --baseline "$RUNS/baseline" --out "$RUNS/report"
cp "$RUNS/report/report.md" "$RUNS/report/loss_vs_flops.png" "$RUNS/report/curriculum_vs_baseline.png" "$DEST/"
