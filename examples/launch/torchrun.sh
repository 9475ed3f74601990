#!/usr/bin/env bash
# Multi-node (or single-node) data parallel with torchrun. Run this on every node, with the same
# RDZV_ID and MASTER_ADDR; all ranks write into one run directory, runs/<run_name>/torchrun-<RDZV_ID>.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 RDZV_ID=exp42 GPUS_PER_NODE=8 ./torchrun.sh stage=sft
set -euo pipefail
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l || echo 1)}
torchrun \
  --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}" \
  --rdzv-id="${RDZV_ID:-llmexp}" \
  -m llmexp strategy=${STRATEGY:-fsdp} trainer=gpu \
  trainer.devices="$GPUS_PER_NODE" trainer.num_nodes="$NNODES" "$@"
