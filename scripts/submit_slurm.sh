#!/usr/bin/env bash
# Submit a training job to SLURM with sensible defaults:
#
#   scripts/submit_slurm.sh [--nodes N] [--cpus-per-node C] [--gpus-per-node G] [--time T]
#                           [--signal-lead S] [--max-requeues R] [--partition P] [-- SBATCH...]
#                           CONFIG [key=value ...]
#
# Defaults: 1 node, all its CPUs (--exclusive), no GPUs, 4 hours, USR1 120 s before the limit,
# 5 requeues. Multi-node jobs get --no-kill so the loss of a node shrinks the job instead of ending
# it. Prints the job id. Run from the project root.
set -euo pipefail
cd "$(dirname "$0")/.."

nodes=1 cpus="" gpus=0 time_limit=04:00:00 lead=120 requeues=5 partition="" extra=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --nodes) nodes=$2; shift 2 ;;
        --cpus-per-node) cpus=$2; shift 2 ;;
        --gpus-per-node) gpus=$2; shift 2 ;;
        --time) time_limit=$2; shift 2 ;;
        --signal-lead) lead=$2; shift 2 ;;
        --max-requeues) requeues=$2; shift 2 ;;
        --partition) partition=$2; shift 2 ;;
        --) shift; while [[ $# -gt 0 && $1 != *.yaml && $1 != *.yml ]]; do extra+=("$1"); shift; done ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        -*) echo "submit_slurm.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) break ;;
    esac
done
if [[ $# -lt 1 ]]; then
    echo "submit_slurm.sh: give a CONFIG (e.g. configs/slurm.yaml); see --help" >&2
    exit 2
fi
if [[ ! -f $1 ]]; then
    echo "submit_slurm.sh: config file '$1' not found" >&2
    exit 2
fi
for n in "$nodes" "$gpus" "$lead" "$requeues"; do
    [[ $n =~ ^[0-9]+$ ]] || { echo "submit_slurm.sh: '$n' is not a number" >&2; exit 2; }
done

opts=(--parsable --nodes="$nodes" --ntasks-per-node=1 --time="$time_limit"
      --signal="B:USR1@$lead" --requeue --open-mode=append)
if [[ -n $cpus ]]; then
    opts+=(--cpus-per-task="$cpus")
else
    opts+=(--exclusive)
fi
(( gpus > 0 )) && opts+=(--gres="gpu:$gpus")
(( nodes > 1 )) && opts+=(--no-kill)
[[ -n $partition ]] && opts+=(--partition="$partition")
MAX_REQUEUES=$requeues exec sbatch "${opts[@]}" "${extra[@]}" slurm/train.sbatch "$@"
