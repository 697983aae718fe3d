#!/usr/bin/env bash
# One SLURM job of a curriculum: the remaining stages (or one, with --stage), each as an srun step
# with one task per rank. Requeues itself when stopped by the time limit / preemption, or when a
# rank died; the next start resumes from the latest complete checkpoint.
#
#   sbatch [sbatch options] slurm/stage.sh CONFIG [--run-dir DIR] [--set key=value ...] [--stage NAME]
#
# The arguments are those of `llmagogy run`. Options on the sbatch command line override the
# #SBATCH defaults below (e.g. sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 --time=2-00:00:00).
# `llmagogy submit CONFIG` submits one such job per stage with the stage's `resources`.
#
# Environment (sbatch exports the submitting shell's environment):
#   LLMAGOGY_PYTHON             the python that has llmagogy_ds installed (default: python/python3 on PATH,
#                               e.g. the activated venv)
#   LLMAGOGY_MAX_FAILURES       how many times a job requeues itself after a failed step (default 3);
#                               stops for the time limit / preemption do not count
#   LLMAGOGY_NPROC              ranks per stage instead of the config's train.nproc: a number, or "all"
#                               (every task of the job); the trainer keeps the stage's global batch
#   LLMAGOGY_COLLECTIVE_TIMEOUT seconds before a collective fails when a rank hangs (default 600)
#
#SBATCH --job-name=llmagogy
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --output=llmagogy-%j.log
#
# Signals: USR1 comes 300 s before the time limit (B: to this shell only, keep in sync with
# SIGNAL_GRACE_S in llmagogy_ds/cluster/slurm.py); TERM comes with scancel or preemption. Either is
# passed to srun, which forwards it to every rank: the ranks finish the current optimizer step,
# save a checkpoint and exit 0 (train.py's StopFlag). Then this script requeues the job.
set -uo pipefail

log() { echo "[stage.sh $(date '+%F %T')] job ${SLURM_JOB_ID:-?}: $*"; }

if [ -z "${SLURM_JOB_ID:-}" ] || [ $# -lt 1 ]; then
  echo "usage: sbatch [options] slurm/stage.sh CONFIG [--run-dir DIR] [--set key=value ...] [--stage NAME]" >&2
  echo "(a batch script; without SLURM use llmagogy run)" >&2
  exit 2
fi

PY=${LLMAGOGY_PYTHON:-$(command -v python || command -v python3 || true)}
if [ -z "$PY" ] || ! "$PY" -c "import llmagogy_ds" 2>/dev/null; then
  log "no python with llmagogy_ds installed (tried '${PY:-python}'): activate the venv before sbatch, or set LLMAGOGY_PYTHON"
  exit 2
fi

STAGE=""  # --stage NAME among the arguments (they go to `llmagogy prepare` unchanged)
ARGS=("$@")
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  case "${ARGS[i]}" in
    --stage) STAGE=${ARGS[i + 1]:-} ;;
    --stage=*) STAGE=${ARGS[i]#--stage=} ;;
  esac
done

SIGNALED=""   # the signal that asked us to stop, if any
STEP_PID=""   # the srun of the running stage
on_signal() {
  [ -n "$SIGNALED" ] && return  # once is enough (requeue itself sends us TERM)
  SIGNALED=$1
  if [ -n "$STEP_PID" ]; then
    log "got SIG$1: the ranks checkpoint and stop"
    # USR1 whatever we got: srun forwards it to every task (a TERM to srun may end the step hard)
    kill -USR1 "$STEP_PID" 2>/dev/null
  else
    log "got SIG$1 between stages"
  fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

requeue() {  # requeue REASON: back into the queue; SLURM starts this script again from the top
  log "requeue: $1"
  trap '' USR1 TERM  # the requeue itself signals this shell
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    log "scontrol requeue failed: resubmit by hand (the run resumes from its latest complete checkpoint)"
    exit 1
  fi
  exit 0
}

FAILS_FILE=""
failed() {  # failed REASON: requeue, unless this job failed too often already
  local max=${LLMAGOGY_MAX_FAILURES:-3} n=0
  [ -s "$FAILS_FILE" ] && n=$(cat "$FAILS_FILE")
  n=$((n + 1))
  echo "$n" > "$FAILS_FILE"
  if [ "$n" -gt "$max" ]; then
    log "$1; failure $n, more than LLMAGOGY_MAX_FAILURES=$max: giving up (resubmit after fixing the cause)"
    exit 1
  fi
  requeue "$1 (failure $n of at most $max)"
}

log "start on ${SLURM_JOB_NODELIST} (restart ${SLURM_RESTART_COUNT:-0}), $PY"

# (a) open the run dir and prepare tokenizer + data, once, on the batch host. A config or data
# error is not worth a requeue: it would fail the same way again.
RUN_DIR=$("$PY" -m llmagogy_ds.cli prepare "$@") || { log "llmagogy prepare failed (see above): not requeued"; exit 1; }
RUN_DIR=$(cd "$RUN_DIR" && pwd)
mkdir -p "$RUN_DIR/slurm"
FAILS_FILE=$RUN_DIR/slurm/job-$SLURM_JOB_ID.failures

TODO=$("$PY" -m llmagogy_ds.cluster.slurm todo "$RUN_DIR" ${STAGE:+--stage "$STAGE"}) \
  || { log "cannot list the stages of $RUN_DIR (see above)"; exit 1; }

# Rendezvous for every step of this job (llmagogy_ds.parallel.rendezvous.master_port): per job, so concurrent
# jobs on a node do not clash, and the same after a requeue. srun places a step that needs
# fewer nodes than the job on the job's first nodes, so the first node hosts rank 0.
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE  # from the submitting shell: the ranks take SLURM's
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning}
JOB_NODES=${SLURM_JOB_NUM_NODES:-1}
JOB_TASKS=${SLURM_NTASKS:-1}
STEP_ERR=$(mktemp "${TMPDIR:-/tmp}/llmagogy-step.XXXXXX")
trap 'rm -f "$STEP_ERR"' EXIT

mapfile -t TODO_LINES <<< "$TODO"
for LINE in "${TODO_LINES[@]}"; do
  read -r NAME NPROC <<< "$LINE"
  [ -n "$NAME" ] || continue
  [ -n "$SIGNALED" ] && requeue "stopped by SIG$SIGNALED before stage $NAME"
  case "${LLMAGOGY_NPROC:-}" in
    "") ;;
    all) NPROC=$JOB_TASKS ;;
    *) NPROC=$LLMAGOGY_NPROC ;;
  esac
  if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    log "LLMAGOGY_NPROC must be a positive number or 'all', got '$NPROC'"
    exit 1
  fi
  if [ "$NPROC" -gt "$JOB_TASKS" ]; then
    log "stage $NAME needs $NPROC ranks (train.nproc) but this job has $JOB_TASKS tasks: submit it with" \
        "--nodes/--ntasks-per-node giving $NPROC tasks (llmagogy submit does), or set LLMAGOGY_NPROC"
    exit 1
  fi
  NODES=$((JOB_NODES < NPROC ? JOB_NODES : NPROC))
  "$PY" -m llmagogy_ds.cluster.slurm note "$RUN_DIR" "$NAME" "$SLURM_JOB_ID" || true
  log "stage $NAME: $NPROC rank(s) on $NODES node(s), rendezvous $MASTER_ADDR:$MASTER_PORT"

  # (b) one task per rank. --kill-on-bad-exit: when one rank dies, srun kills the others at once
  # instead of leaving them in a collective. srun's stderr is also kept to tell which rank failed.
  exec 3> >(tee "$STEP_ERR" >&2)
  TEE_PID=$!
  srun --kill-on-bad-exit=1 --ntasks="$NPROC" --nodes="$NODES" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    "$PY" -m llmagogy_ds.train --run-dir "$RUN_DIR" --stage "$NAME" ${LLMAGOGY_TRAIN_ARGS:-} 2>&3 </dev/null &
  STEP_PID=$!
  while :; do
    wait "$STEP_PID"; RC=$?
    # a trapped signal interrupts `wait` (status > 128) while srun still runs: wait again
    if [ "$RC" -gt 128 ] && kill -0 "$STEP_PID" 2>/dev/null; then continue; fi
    break
  done
  STEP_PID=""
  exec 3>&-
  wait "$TEE_PID" 2>/dev/null

  # (c) what happened
  STAGE_DIR=$(ls -d "$RUN_DIR"/stages/[0-9][0-9]_"$NAME" 2>/dev/null | head -n 1)
  if [ -n "$STAGE_DIR" ] && [ -f "$STAGE_DIR/result.json" ]; then
    log "stage $NAME: done"
    continue
  fi
  [ -n "$SIGNALED" ] && requeue "stage $NAME stopped by SIG$SIGNALED (checkpoint saved)"
  if [ "$RC" -eq 0 ]; then
    # the ranks stopped on a signal sent to them directly (e.g. scancel --signal=USR1 without --batch)
    requeue "stage $NAME stopped before its end (checkpoint saved)"
  fi
  # which rank and why: srun's own lines ("task 1: Killed", "task 0: Exited with exit code 1") and
  # the last exception a rank printed
  WHY=$(grep -E '^srun: error: .*task [0-9]+' "$STEP_ERR" | sed 's/^srun: error: //' | head -n 4 | paste -sd ';' -)
  EXC=$(grep -E '^(\[rank[0-9]+\]: )?[A-Za-z_.]*(Error|Exception|Interrupt)\b' "$STEP_ERR" | tail -n 1 | cut -c 1-200)
  failed "stage $NAME: srun exit $RC${WHY:+ ($WHY)}${EXC:+; last error: $EXC}"
done

if [ -z "$STAGE" ] && [ -f "$RUN_DIR/summary.json" ]; then
  "$PY" -m llmagogy_ds.cli summary "$RUN_DIR" || true
fi
log "finished"
