#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_check.sh installs on a GPU machine without network
# (Python 3.12, torch 2.11 + CUDA, transformers, safetensors, tokenizers, numpy, pyyaml, tqdm, rich,
# einops, msgpack, ninja, psutil, py-cpuinfo, nvidia-ml-py are there; DeepSpeed, megatron-core,
# pydantic and hjson are not) into .whl/ in the repository root (ignored by .gitignore).
#
#   bash benchmarks/gpu_wheels.sh            # then pass .whl in the device tool's carry list
#
# DeepSpeed publishes only a source archive; it builds into a pure-Python wheel (no ops compiled:
# they are JIT-built on the GPU machine) with this checkout's venv, which holds the torch its
# setup.py imports. Not carried: datasets (hub sources only), wandb (the check runs with
# wandb.mode=disabled) and torch itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=.whl
rm -rf "$OUT"
mkdir -p "$OUT"

# one version of each (two versions of a name stop the whole install); pins = this repo's venv
BINARY=(
  megatron-core==0.16.1
  pydantic==2.14.4          # DeepSpeed's config models
  pydantic-core==2.50.5     # pydantic 2.14.4 pins it
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0 # pydantic 2.14 needs >= 4.16; the image's may be older
  hjson==3.1.0
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$OUT" "${BINARY[@]}"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" deepspeed==0.19.8

ls -l "$OUT"
du -cb "$OUT"/*.whl | tail -1 | awk '{printf "total %.1f MiB in %d wheels\n", $1 / 1048576, '"$(ls "$OUT"/*.whl | wc -l)"'}'
