#!/usr/bin/env bash
# Launch `fastft train` with DeepSpeed's launcher (sets parallel.backend=deepspeed; a later override still wins).
# One node:  NUM_GPUS=8 launchers/deepspeed.sh --config configs/vit_b16_deepspeed.toml
# Nodes (run on node 0; passwordless ssh + pdsh): HOSTFILE=launchers/hostfile launchers/deepspeed.sh --config ...
# CPU only:  NUM_GPUS is the number of processes (gloo). MASTER_ADDR empty: the first hostfile host, or localhost.
set -euo pipefail
DEEPSPEED=${DEEPSPEED:-deepspeed}
HOSTFILE=${HOSTFILE:-}
if [[ -n "$HOSTFILE" && ! -f "$HOSTFILE" ]]; then echo "deepspeed.sh: HOSTFILE $HOSTFILE not found" >&2; exit 2; fi
NUM_GPUS=${NUM_GPUS:-$({ nvidia-smi -L 2>/dev/null || true; } | wc -l | awk '{print ($1>0)?$1:1}')}
NUM_NODES=${NUM_NODES:-$(if [[ -n "$HOSTFILE" ]]; then grep -cvE '^[[:space:]]*(#|$)' "$HOSTFILE"; else echo 1; fi)}
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-29500}
args=(--num_gpus "$NUM_GPUS" --num_nodes "$NUM_NODES" --master_port "$MASTER_PORT")
if [[ -n "$HOSTFILE" ]]; then args+=(--hostfile "$HOSTFILE"); fi
if [[ -n "$MASTER_ADDR" ]]; then args+=(--master_addr "$MASTER_ADDR"); fi
exec "$DEEPSPEED" "${args[@]}" --module fastft train --parallel.backend=deepspeed "$@"
