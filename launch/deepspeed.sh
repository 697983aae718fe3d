#!/usr/bin/env bash
# One stage with the DeepSpeed launcher over a hostfile (pdsh/ssh between nodes):
#   launch/deepspeed.sh HOSTFILE RUN_DIR STAGE
# HOSTFILE lines: "node1 slots=8". The run directory must be on a shared file system.
set -euo pipefail
HOSTFILE=${1:?usage: $0 HOSTFILE RUN_DIR STAGE}; RUN_DIR=${2:?run dir}; STAGE=${3:?stage name}
exec deepspeed --hostfile "$HOSTFILE" --module llmagogy_ds.train --run-dir "$RUN_DIR" --stage "$STAGE"
