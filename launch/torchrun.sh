#!/usr/bin/env bash
# One stage on this node with torchrun: launch/torchrun.sh RUN_DIR STAGE [NPROC]
# (`llmagogy run` does this for every stage; use this to run one stage by hand.)
# Multi-node without SLURM: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on every node.
set -euo pipefail
RUN_DIR=${1:?usage: $0 RUN_DIR STAGE [NPROC]}; STAGE=${2:?stage name}; NPROC=${3:-${NPROC:-1}}
if [ "${NNODES:-1}" -gt 1 ]; then
  RDZV=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?}" --master_addr="${MASTER_ADDR:?}" --master_port="${MASTER_PORT:-29500}")
else
  RDZV=(--standalone)
fi
exec python -m torch.distributed.run "${RDZV[@]}" --nproc_per_node="$NPROC" \
  -m llmagogy_ds.train --run-dir "$RUN_DIR" --stage "$STAGE"
