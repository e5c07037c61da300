#!/usr/bin/env bash
# Launch `fastft train` with torchrun (DDP). Single node:   NPROC_PER_NODE=8 launchers/torchrun.sh --config run.toml
# Multi-node (run on every node): NNODES=2 NODE_RANK=0|1 MASTER_ADDR=node0 launchers/torchrun.sh --config run.toml
set -euo pipefail
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l | awk '{print ($1>0)?$1:1}')}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  -m fastft train "$@"
