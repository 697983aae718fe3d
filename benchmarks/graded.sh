#!/usr/bin/env bash
# configs/graded.yaml curriculum vs its from-scratch baseline (docs/benchmarks.md, section 5; the sweep: section 6).
#
#   bash benchmarks/graded.sh            # everything, one job after another (~1-1.5 h on the 2-core CPU)
#   STEP=curriculum bash benchmarks/graded.sh   # one step: curriculum | baseline | eval | fullpairs | report | attempts | subset
#
# Environment: LLMAGOGY_CORPUS (default /work/shared/corpus), RUNS (default runs; git-ignored),
# LLM (default .venv/bin/llmagogy), FACTOR (baseline compute factor, default 1.0). Heavy jobs run
# strictly one after another: on a 2-core CPU two at once would each run at half speed.
set -euo pipefail
cd "$(dirname "$0")/.."

CORPUS=${LLMAGOGY_CORPUS:-/work/shared/corpus}
RUNS=${RUNS:-runs}
LLM=${LLM:-.venv/bin/llmagogy}
STEP=${STEP:-all}
SUB=${SUB:-/tmp/evalsub}          # fixed BLiMP/Zorro subset (first 200 pairs of every paradigm file)
export LLMAGOGY_CORPUS=$CORPUS

want() { [[ $STEP == all || $STEP == "$1" ]]; }

# The fixed minimal-pair subset: the first 200 pairs of each of BLiMP's 67 files (13,400 pairs)
# and of Zorro's 23 files (4,600 pairs). Kept outside the project; rebuilt in seconds.
make_subset() {
  mkdir -p "$SUB/blimp" "$SUB/zorro"
  for f in "$CORPUS"/eval/blimp/*.jsonl; do head -n 200 "$f" > "$SUB/blimp/$(basename "$f")"; done
  for f in "$CORPUS"/eval/zorro/*.jsonl; do head -n 200 "$f" > "$SUB/zorro/$(basename "$f")"; done
}
if [[ $STEP == subset ]]; then make_subset; exit 0; fi  # only the subset (the sweep's eval: section reads it)

evaluate() {  # the run's last finished stage: BLiMP, Zorro (subset), WikiText-2 bits per byte
  "$LLM" eval "$1" --pairs "$SUB/blimp" --pairs "$SUB/zorro" --text "$CORPUS/eval/wikitext2_valid.txt"
}

# 1. The curriculum: 5 stages, 4.6M tokens, 54.5 TFLOPs.
if want curriculum; then
  "$LLM" run configs/graded.yaml --run-dir "$RUNS/graded" --set wandb.mode=disabled
fi

# 2. The from-scratch baseline: the final 6 x 192 architecture on all stages' corpora mixed,
#    1.0 x the curriculum's measured FLOPs (its own cosine schedule ends there). 1.5 x would let a
#    ratio above 1 be measured; it did not fit the session's time (docs/benchmarks.md, section 4).
if want baseline; then
  "$LLM" baseline configs/graded.yaml --curriculum "$RUNS/graded" --run-dir "$RUNS/graded-baseline" \
    --set wandb.mode=disabled --set baseline.compute_factor=${FACTOR:-1.0}
fi

# 3. BLiMP, Zorro and WikiText-2 of both final models (eval.json beside each model.pt).
if want eval; then
  make_subset
  evaluate "$RUNS/graded"
  evaluate "$RUNS/graded-baseline"
fi

# 3b. All 113,000 BLiMP and Zorro pairs for the two main models. `eval` of a weights file other
#     than model.pt writes eval_<stem>.json, so a hard link keeps eval.json (subset) as it is.
if want fullpairs; then
  for S in "$RUNS/graded/stages/04_general" "$RUNS/graded-baseline/stages/00_baseline"; do
    ln -f "$S/model.pt" "$S/full.pt"
    "$LLM" eval "$S/full.pt" --pairs "$CORPUS/eval/blimp" --pairs "$CORPUS/eval/zorro"
  done
fi

# 4. The report: report.md and four PNGs in RUNS/graded/report/.
if want report; then
  "$LLM" report "$RUNS/graded" --baseline "$RUNS/graded-baseline"
fi

# 5. Improvement attempts. Each reuses the curriculum run's stages that its config leaves unchanged:
#    they are copied from RUNS/graded (the run skips a stage whose result.json exists; a rerun of
#    them would repeat the same seeded computation) and only the changed stages train. Each keeps
#    the total FLOPs <= the baseline's and the final architecture, so the same baseline serves.
#    a. configs/graded-f1last.yaml: F = 1 at the last transition (stages nursery..highschool reused)
#    b. configs/graded-late.yaml: highschool 123 steps instead of 245, general 347 instead of 269,
#       equal total FLOPs (stages nursery..middle reused)
attempt() {  # attempt NAME CONFIG N_REUSED_STAGES
  local A="$RUNS/$1" n=$3
  if [[ ! -e $A/config.yaml ]]; then
    mkdir -p "$A/stages"
    cp "$RUNS/graded/tokenizer.json" "$A/"
    cp -r "$RUNS/graded/data" "$A/"
    for s in 00_nursery 01_primary 02_middle 03_highschool; do
      if (( 10#${s:0:2} < n )); then cp -r "$RUNS/graded/stages/$s" "$A/stages/"; fi
    done
  fi
  "$LLM" run "$2" --run-dir "$A" --set wandb.mode=disabled
  "$LLM" report "$A" --baseline "$RUNS/graded-baseline"
  make_subset
  evaluate "$A"
}
if want attempts; then
  attempt graded-f1last configs/graded-f1last.yaml 4
  attempt graded-late configs/graded-late.yaml 3
fi
