#!/usr/bin/env bash
# The tokenization of a curriculum's sources as a CPU job of its own, before the GPU stages
# (`llmagogy submit` puts it first; the first stage's job waits for it with afterok). As an array
# job, task I of N tokenizes the I-th of N contiguous parts of every text source, and the task that
# finishes last merges the parts (megatron-core IndexedDatasetBuilder.add_index) into the source's
# cache entry; the GPU jobs then only memory-map it.
#
#   sbatch --array=0-(N-1) --cpus-per-task=C [options] slurm/tokenize.sh CONFIG --run-dir DIR
#
# Environment: LLMAGOGY_PYTHON as for stage.sh; LLMAGOGY_DATA_CACHE (the cache, if not run.data_cache).
#SBATCH --job-name=llmagogy-tokenize
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=llmagogy-tokenize-%A_%a.log
set -euo pipefail

if [ -z "${SLURM_JOB_ID:-}" ] || [ $# -lt 1 ]; then
  echo "usage: sbatch [--array=0-N] [options] slurm/tokenize.sh CONFIG --run-dir DIR" >&2
  echo "(a batch script; without SLURM use llmagogy tokenize)" >&2
  exit 2
fi
PY=${LLMAGOGY_PYTHON:-$(command -v python || command -v python3 || true)}
if [ -z "$PY" ] || ! "$PY" -c "import llmagogy_ds" 2>/dev/null; then
  echo "no python with llmagogy_ds installed (tried '${PY:-python}'): set LLMAGOGY_PYTHON" >&2
  exit 2
fi
PART=()
if [ -n "${SLURM_ARRAY_TASK_COUNT:-}" ] && [ "${SLURM_ARRAY_TASK_COUNT}" -gt 1 ]; then
  PART=(--partition "$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0} + 1))/${SLURM_ARRAY_TASK_COUNT}")
fi
exec "$PY" -m llmagogy_ds.cli tokenize "$@" --workers "${SLURM_CPUS_PER_TASK:-1}" "${PART[@]}"
