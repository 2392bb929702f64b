#!/usr/bin/env bash
# Train on several nodes, listed in a hostfile ("HOSTNAME slots=GPUS" per line; see launch/hostfile.example).
#
#   launch/multi_node.sh --hostfile PATH [--master_addr HOST] [--master_port P] [--num_nodes N] [--gpus N]
#                        [--config PATH] [--launcher deepspeed|torchrun] [--dry-run] [-- TRAIN.PY ARGS...]
#
# --launcher deepspeed (default): run once, on the first node; the DeepSpeed launcher starts every node over
#   ssh (pdsh), so all hosts need passwordless ssh and the repo at the same path.
# --launcher torchrun: run the same command on every node (no ssh); they meet at MASTER_ADDR:MASTER_PORT.
# Defaults come from the environment: HOSTFILE, MASTER_ADDR (the hostfile's first host), MASTER_PORT (29500),
# NUM_NODES (all hosts), NUM_GPUS (each host's slots), CONFIG (ds_configs/qft.json), LAUNCHER, RDZV_ID (qft),
# DRY_RUN (0). Paths are relative to the repo root. NCCL_NVLS_ENABLE defaults to 0 (see docs/multi_gpu.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=launch/lib.sh
source launch/lib.sh

hostfile="${HOSTFILE:-}"
addr="${MASTER_ADDR:-}"
port="${MASTER_PORT:-29500}"
nodes="${NUM_NODES:-}"
gpus="${NUM_GPUS:-}"
config="${CONFIG:-ds_configs/qft.json}"
launcher="${LAUNCHER:-deepspeed}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --hostfile) need_value "$@"; hostfile="$2"; shift 2 ;;
        --master_addr) need_value "$@"; addr="$2"; shift 2 ;;
        --master_port) need_value "$@"; port="$2"; shift 2 ;;
        --num_nodes) need_value "$@"; nodes="$2"; shift 2 ;;
        --gpus) need_value "$@"; gpus="$2"; shift 2 ;;
        --config) need_value "$@"; config="$2"; shift 2 ;;
        --launcher) need_value "$@"; launcher="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (train.py's own options go after '--')" ;;
    esac
done

# The hostfile, checked here because DeepSpeed only warns about a missing one and then runs on this node alone.
[[ -n "$hostfile" ]] || die "no hostfile: pass --hostfile PATH (or set HOSTFILE); see launch/hostfile.example"
[[ -f "$hostfile" ]] || die "hostfile not found: $hostfile (relative paths are taken from the repo root, $PWD)"
hosts=() slots=()
lineno=0
while IFS= read -r line || [[ -n "$line" ]]; do
    lineno=$((lineno + 1))
    line="${line#"${line%%[![:space:]]*}"}"  # strip leading blanks
    [[ -z "$line" || "$line" == \#* ]] && continue
    [[ "$line" =~ ^([^[:space:]]+)[[:space:]]+slots=([0-9]+) ]] ||
        die "$hostfile line $lineno: expected 'HOSTNAME slots=N', got '$line'"
    host="${BASH_REMATCH[1]}" n="${BASH_REMATCH[2]}"
    for h in "${hosts[@]}"; do
        [[ "$h" != "$host" ]] || die "$hostfile line $lineno: host '$h' is listed twice"
    done
    need_positive_int "$hostfile line $lineno: slots" "$n"
    hosts+=("$host") slots+=("$n")
done < "$hostfile"
[[ ${#hosts[@]} -gt 0 ]] || die "$hostfile lists no host"

nodes="${nodes:-${#hosts[@]}}"
need_positive_int "--num_nodes/NUM_NODES" "$nodes"
[[ "$nodes" -le ${#hosts[@]} ]] || die "--num_nodes $nodes, but $hostfile lists ${#hosts[@]} host(s)"
if [[ -n "$gpus" ]]; then
    need_positive_int "--gpus/NUM_GPUS" "$gpus"
    for ((i = 0; i < nodes; i++)); do
        [[ "$gpus" -le "${slots[i]}" ]] || die "--gpus $gpus, but ${hosts[i]} has slots=${slots[i]} in $hostfile"
    done
fi
addr="${addr:-${hosts[0]}}"
[[ "$addr" =~ ^[^[:space:]]+$ ]] || die "--master_addr/MASTER_ADDR must be a host name or address, got '$addr'"
need_port "--master_port/MASTER_PORT" "$port"
need_config "$config"
need_no_deepspeed_arg "$@"
env_args=(env NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}")  # the DeepSpeed launcher forwards NCCL_* to every node

case "$launcher" in
    deepspeed)
        cmd=(deepspeed --hostfile "$hostfile" --master_addr "$addr" --master_port "$port" --num_nodes "$nodes")
        [[ -z "$gpus" ]] || cmd+=(--num_gpus "$gpus")
        run_or_print "${env_args[@]}" "${cmd[@]}" train.py --deepspeed "$config" "$@" ;;
    torchrun)
        if [[ -z "$gpus" ]]; then  # torchrun starts the same number of processes on every node
            gpus="${slots[0]}"
            for ((i = 1; i < nodes; i++)); do
                [[ "${slots[i]}" == "$gpus" ]] ||
                    die "torchrun needs the same GPU count on every node: ${hosts[i]} has slots=${slots[i]}," \
                        "${hosts[0]} slots=$gpus; pass --gpus N"
            done
        fi
        run_or_print "${env_args[@]}" torchrun --nnodes "$nodes" --nproc_per_node "$gpus" --rdzv_backend c10d \
            --rdzv_endpoint "$addr:$port" --rdzv_id "${RDZV_ID:-qft}" train.py --deepspeed "$config" "$@" ;;
    *) die "--launcher/LAUNCHER must be deepspeed or torchrun, got '$launcher'" ;;
esac
