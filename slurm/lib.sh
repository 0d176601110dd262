# Helpers for slurm/train.sbatch, kept apart so they can be tested on their own. Source it.

log() { echo "[$(date +%H:%M:%S) slurm] $*"; }

# The allocation's nodes, one per line, the head (first) first.
slurm_nodes() {
    scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a SLURM job}"
}

# An IPv4 address of a node, as the other nodes reach it.
slurm_node_ip() {
    local ip
    ip=$(getent ahostsv4 "$1" 2>/dev/null | awk 'NR == 1 {print $1}')
    echo "${ip:-$1}"
}

# A block of 100 ports per job id, so two jobs sharing a node do not collide: 20000 + (id % 400) * 100.
slurm_port_base() {
    echo $(( 20000 + ($1 % 400) * 100 ))
}

# Ray's ports inside the block: fixed ones first, then 90 worker ports.
ray_port_args() {
    local base=$1 role=$2
    local args="--node-manager-port=$((base + 1)) --object-manager-port=$((base + 2))"
    args+=" --metrics-export-port=$((base + 6)) --runtime-env-agent-port=$((base + 7))"
    args+=" --dashboard-agent-listen-port=$((base + 8)) --dashboard-agent-grpc-port=$((base + 9))"
    args+=" --min-worker-port=$((base + 10)) --max-worker-port=$((base + 99))"
    if [[ $role == head ]]; then
        args+=" --port=$base --ray-client-server-port=$((base + 3))"
    fi
    echo "$args"
}

# CPUs on each node of the allocation (SLURM_CPUS_ON_NODE, else 1).
slurm_cpus_per_node() {
    echo "${SLURM_CPUS_ON_NODE:-1}"
}

# GPUs on each node: SLURM_GPUS_ON_NODE, else the count in SLURM_JOB_GPUS / CUDA_VISIBLE_DEVICES.
slurm_gpus_per_node() {
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n ${SLURM_JOB_GPUS:-} ]]; then
        awk -F, '{print NF}' <<< "$SLURM_JOB_GPUS"
    else
        echo 0
    fi
}
