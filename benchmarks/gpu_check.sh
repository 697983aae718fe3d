#!/usr/bin/env bash
# The one-call GPU check (benchmarks/gpu_check.py says what it runs): one command of <= 8 minutes on
# one H100/H200 without network. The wheels of benchmarks/gpu_wheels.sh (.whl/, carried with the
# working tree) are installed into /tmp/site first; the results go to $OUT/gpu_check.json.
#
#   bash benchmarks/gpu_check.sh              # GPU machine (python3 with torch + CUDA)
#   bash benchmarks/gpu_check.sh --cpu        # CPU mode: the same code paths at tiny shapes
#
# Other arguments go to benchmarks/gpu_check.py (--parts, --out, --work, --budget).
set -uo pipefail
cd "$(dirname "$0")/.."
CPU=${LLMAGOGY_GPU_CHECK_CPU:-}
for a in "$@"; do [ "$a" = "--cpu" ] && CPU=1; done
source benchmarks/gpu_env.sh
exec "$PYTHON" benchmarks/gpu_check.py "$@"
