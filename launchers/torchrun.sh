#!/usr/bin/env bash
# Launch `fastft train` with torchrun (DDP). Single node:   NPROC_PER_NODE=8 launchers/torchrun.sh --config run.toml
# Multi-node (run on every node): NNODES=2 MASTER_ADDR=node0 launchers/torchrun.sh --config run.toml
# Nodes meet through c10d rendezvous at MASTER_ADDR:MASTER_PORT (ranks are assigned there; NODE_RANK is not needed).
# A failed worker restarts the node's workers up to MAX_RESTARTS times; pass --resume=auto so the restart continues
# from the run's last.pt (without --run.name the run folder is named from the config, so it is found again).
set -euo pipefail
PYTHON=${PYTHON:-python}
# Restarted workers must not reuse the agent's rendezvous store: its keys from the failed round make the new process
# group connect to dead peers (pytorch/pytorch#167288); with this each round's workers get a store of their own.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
NPROC=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l | awk '{print ($1>0)?$1:1}')}
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
  --rdzv_id="${RDZV_ID:-${SLURM_JOB_ID:-fastft}}" \
  --max_restarts="${MAX_RESTARTS:-3}" \
  -m fastft train "$@"
