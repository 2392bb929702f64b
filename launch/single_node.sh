#!/usr/bin/env bash
# Train on N GPUs of this node with the DeepSpeed launcher (one process per GPU).
#
#   launch/single_node.sh [--gpus N] [--config PATH] [--master_port P] [--dry-run] [-- TRAIN.PY ARGS...]
#
# Defaults come from the environment: NUM_GPUS (1), CONFIG (ds_configs/qft.json), MASTER_PORT (29500),
# DRY_RUN (0). Paths are relative to the repo root. NCCL_NVLS_ENABLE defaults to 0 (see docs/multi_gpu.md).
# Example: launch/single_node.sh --gpus 8 -- --max_steps 1000 --output_dir runs/a
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=launch/lib.sh
source launch/lib.sh

gpus="${NUM_GPUS:-1}"
config="${CONFIG:-ds_configs/qft.json}"
port="${MASTER_PORT:-29500}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --gpus) need_value "$@"; gpus="$2"; shift 2 ;;
        --config) need_value "$@"; config="$2"; shift 2 ;;
        --master_port) need_value "$@"; port="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) sed -n '2,8p' "${BASH_SOURCE[0]}"; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (train.py's own options go after '--')" ;;
    esac
done
need_positive_int "--gpus/NUM_GPUS" "$gpus"
need_port "--master_port/MASTER_PORT" "$port"
need_config "$config"
need_no_deepspeed_arg "$@"

run_or_print env NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}" \
    deepspeed --num_gpus "$gpus" --master_port "$port" train.py --deepspeed "$config" "$@"
